"""InstantID's attention patch on a tiny SDXL with two transformer blocks per attention and a
fabricated InstantID checkpoint (Resampler over 512-d face embeddings, 16 tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from farm.tiny_components import build_tiny_ip_adapter  # noqa: E402
from patching import ModelPatcher, PatchError  # noqa: E402
from patching.instantid import InstantIDPatch, combine_embeddings, uncond_embedding  # noqa: E402
from patching.ip_adapter import cross_attention_layers, load_ip_adapter  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = build_tiny_ip_adapter(
        "sdxl", tmp_path_factory.mktemp("instantid"), plus=True, tokens=16, embedding_dim=512, image_encoder=False
    )
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    faces = torch.randn(2, 512, generator=torch.Generator().manual_seed(5)) * 20  # raw ArcFace scale
    out = {"pipe": pipe, "adapter": load_ip_adapter(folder / "ip-adapter.bin"), "faces": faces}
    out["unpatched"] = render(pipe)
    return out


def render(pipe: Any, steps: int = 4, on_step: Any = None) -> Any:
    generator = torch.Generator().manual_seed(2)
    args = {"prompt": "a portrait", "num_inference_steps": steps, "width": 64, "height": 64, "guidance_scale": 5.0}
    if on_step is not None:
        args["callback_on_step_end"] = on_step
    return pipe(**args, generator=generator, output_type="np").images


def patched(setup: dict, **kwargs: Any) -> Any:
    patch = InstantIDPatch(setup["adapter"], setup["faces"], **kwargs)
    handle = ModelPatcher(setup["pipe"]).apply([patch])
    try:
        return render(setup["pipe"]), handle
    finally:
        handle.remove()


def test_every_cross_attention_is_patched_middle_block_included(setup: dict) -> None:
    _, handle = patched(setup)
    layers = cross_attention_layers(setup["pipe"].unet)
    assert len(layers) == 8  # 4 sites x 2 transformer blocks on the tiny SDXL
    assert handle.replaced_processors == [f"unet.{p}" for p in layers]
    middle = [p for p in handle.replaced_processors if ".mid_block." in p]
    assert middle == [f"unet.mid_block.attentions.0.transformer_blocks.{t}.attn2" for t in (0, 1)]
    assert all(p.endswith(".attn2") and "temporal" not in p for p in handle.replaced_processors)


def test_weight_zero_leaves_the_model_unpatched(setup: dict) -> None:
    images, handle = patched(setup, weight=0.0)
    assert handle.replaced_processors == [] and (images == setup["unpatched"]).all()
    cond, uncond = InstantIDPatch(setup["adapter"], setup["faces"], weight=0.0).face_tokens()
    assert cond.shape == uncond.shape == (1, 16, 64)  # FACE_EMBEDS still come out
    images, _ = patched(setup, weight=1.0)
    assert abs(images - setup["unpatched"]).max() > 1e-3


def test_start_and_end_gate_per_step(setup: dict) -> None:
    pipe = setup["pipe"]
    patch = InstantIDPatch(setup["adapter"], setup["faces"], start_at=0.3, end_at=0.8)
    patcher = ModelPatcher(pipe)
    handle = patcher.apply([patch])
    processor = pipe.unet.get_submodule(handle.replaced_processors[0].removeprefix("unet.")).processor
    seen: list[tuple[float, bool]] = []

    def on_step(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        seen.append((round(patcher.state.percent, 3), processor.branches[0].active(patcher.state)))
        return kwargs

    try:
        windowed = render(pipe, steps=6, on_step=on_step)
    finally:
        handle.remove()
    assert [active for _, active in seen] == [0.3 <= progress <= 0.8 for progress, _ in seen]
    assert any(active for _, active in seen) and not all(active for _, active in seen)
    always, _ = patched(setup)
    assert abs(windowed - always).max() > 1e-4
    never, _ = patched(setup, start_at=1.0, end_at=1.0)  # only the very last timestep could match
    assert abs(never - setup["unpatched"]).max() < 1e-3


def test_mask_gates_only_the_identity_branch(setup: dict) -> None:
    full, _ = patched(setup)
    ones, _ = patched(setup, mask=torch.ones(64, 64))
    zeros, _ = patched(setup, mask=torch.zeros(64, 64))
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    half, _ = patched(setup, mask=left)
    assert (ones == full).all()
    assert (zeros == setup["unpatched"]).all()
    assert abs(half - full).max() > 1e-4 and abs(half - setup["unpatched"]).max() > 1e-4


def test_noise_is_deterministic_per_face(setup: dict) -> None:
    face = combine_embeddings(setup["faces"], "average")
    assert torch.equal(uncond_embedding(face, 0.0), torch.zeros_like(face))
    a, b = uncond_embedding(face, 0.35), uncond_embedding(face.clone(), 0.35)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 0.35
    assert not torch.equal(uncond_embedding(face + 1.0, 0.35), a)  # another face, another draw
    quiet, _ = patched(setup, noise=0.0)
    noisy, _ = patched(setup, noise=0.35)
    again, _ = patched(setup, noise=0.35)
    assert (noisy == again).all() and abs(noisy - quiet).max() > 1e-5


def test_combine_modes() -> None:
    faces = torch.tensor([[3.0, 0.0], [1.0, 4.0]])
    assert torch.equal(combine_embeddings(faces, "average"), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(
        combine_embeddings(faces, "norm_average"), torch.tensor([[(3 / 10**0.5 + 1 / 10**0.5) / 2, 0.5]])
    )
    assert combine_embeddings(faces, "concat").shape == (1, 2, 2)
    with pytest.raises(PatchError, match="expected one of average"):
        combine_embeddings(faces, "max")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": 3.5}, "outside -1..3"),
        ({"start_at": 0.9, "end_at": 0.1}, "start_at <= end_at"),
        ({"noise": 2}, "noise"),
        ({"mask_resize": "area"}, "mask_resize 'area': expected one of bicubic, bilinear"),
    ],
)
def test_seed_node_ranges(setup: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(PatchError, match=message):
        InstantIDPatch(setup["adapter"], setup["faces"], **kwargs)


def test_a_plain_ip_adapter_is_not_an_instantid_checkpoint(tmp_path: Path) -> None:
    folder = build_tiny_ip_adapter("sdxl", tmp_path / "plain", image_encoder=False)
    with pytest.raises(PatchError, match="Resampler image_proj"):
        InstantIDPatch(load_ip_adapter(folder / "ip-adapter.safetensors"), torch.zeros(1, 32))


def test_identitynet_gets_the_face_tokens_as_its_context(setup: dict, tmp_path: Path) -> None:
    from farm.tiny_components import build_tiny_controlnet
    from patching.face_analysis import draw_keypoints
    from patching.instantid import IdentityNetTokens

    controlnet = diffusers.ControlNetModel.from_pretrained(build_tiny_controlnet("sdxl", tmp_path / "identitynet"))
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pipe(setup["pipe"], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    kps = draw_keypoints((64, 64), [(20, 24), (44, 24), (32, 34), (23, 46), (41, 46)])
    instantid = InstantIDPatch(setup["adapter"], setup["faces"])
    cond, uncond = instantid.face_tokens()
    seen: list[Any] = []
    spy = controlnet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True
    )

    def run() -> Any:
        generator = torch.Generator().manual_seed(2)
        return pipe("a portrait", image=kps, num_inference_steps=3, width=64, height=64, guidance_scale=5.0,
                    controlnet_conditioning_scale=0.8, generator=generator, output_type="np").images  # fmt: skip

    patcher = ModelPatcher(setup["pipe"])
    with patcher.running(pipe):
        plain_control = run()  # the ControlNet sees the text embeddings
        text_context = seen[-1]
        handle = patcher.apply([instantid, IdentityNetTokens(controlnet, cond, uncond)])
        after: list[Any] = []  # registered after the patch's hook, so it sees what the model gets
        spy_after = controlnet.register_forward_pre_hook(
            lambda m, a, k: after.append(k["encoder_hidden_states"]), with_kwargs=True
        )
        identity = run()
        spy_after.remove()
        handle.remove()
        seen.clear()
        restored = run()
    spy.remove()
    assert text_context.shape[1] != 16
    assert len(after) == 3 and all(torch.equal(t, torch.cat([uncond, cond])) for t in after)  # [uncond, cond]
    assert abs(identity - plain_control).max() > 1e-4
    assert (restored == plain_control).all()
    assert len(controlnet._forward_pre_hooks) == 0


def test_identitynet_keypoints_from_a_larger_photo_match_the_upstream_drawing(setup: dict, tmp_path: Path) -> None:
    """A 640x480 reference rendered at 64x64: our keypoint image against upstream's drawing on the
    photo's canvas (drawn independently with OpenCV), which the pipeline resizes itself."""
    pytest.importorskip("cv2")
    from farm.tiny_components import build_tiny_controlnet
    from patching.face_analysis import draw_keypoints, keypoint_image
    from patching.instantid import IdentityNetTokens
    from tests.fixtures.keypoints import opencv_keypoint_drawing

    controlnet = diffusers.ControlNetModel.from_pretrained(build_tiny_controlnet("sdxl", tmp_path / "identitynet"))
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pipe(setup["pipe"], controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    keypoints = [(271.3, 201.7), (372.9, 198.2), (322.4, 262.6), (281.1, 318.4), (362.8, 315.9)]
    instantid = InstantIDPatch(setup["adapter"], setup["faces"])
    patcher = ModelPatcher(setup["pipe"])

    def latents(image: Any) -> Any:
        generator = torch.Generator().manual_seed(2)
        return pipe("a portrait", image=image, num_inference_steps=3, width=64, height=64, guidance_scale=5.0,
                    controlnet_conditioning_scale=0.8, generator=generator, output_type="latent").images  # fmt: skip

    with patcher.running(pipe):
        handle = patcher.apply([instantid, IdentityNetTokens(controlnet, *instantid.face_tokens())])
        try:
            ours = latents(keypoint_image(keypoints, (640, 480), (64, 64)))
            upstream = latents(opencv_keypoint_drawing((640, 480), keypoints))
            marks_at_output = latents(draw_keypoints((64, 64), [(x / 10, y * 64 / 480) for x, y in keypoints]))
        finally:
            handle.remove()
    diff, before = (ours - upstream).abs().max(), (marks_at_output - upstream).abs().max()
    print(f"IdentityNet latents: max |ours - upstream drawing| = {diff:.2e}; marks drawn at the output: {before:.2e}")
    assert diff <= 1e-4
    assert before > 1e-3
