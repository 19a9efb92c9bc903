"""IP-Adapter: checkpoint loading, agreement with diffusers' native IP-Adapter, neutral settings,
Fooocus mode, masks and windows, exact unpatch. Tiny models and fabricated checkpoints only."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from farm.tiny_components import build_tiny_ip_adapter  # noqa: E402
from patching import ModelPatcher, PatchError  # noqa: E402
from patching.image_prompt_attention import ImagePromptBranch  # noqa: E402
from patching.ip_adapter import (  # noqa: E402
    ImagePrompt,
    IPAdapterPatch,
    clip_pixels,
    encode_images,
    load_ip_adapter,
)
from patching.state import StepState  # noqa: E402

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# diffusers' IP-Adapter and ours differ only in the order of float operations (their K/V
# projections run per call on the batch, ours once per job): differences are ~1e-7 in the
# UNet output, well under 1e-4 on decoded images in 0..1.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("ip")
    return {
        (family, plus): build_tiny_ip_adapter(family, root / f"{family}-{'plus' if plus else 'plain'}", plus=plus)
        for family in ("sd15", "sdxl")
        for plus in (False, True)
    }


def _pipe(tiny_models: dict[str, Path], family: str) -> Any:
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(tiny_models[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(folder: Path, plus: bool) -> torch.Tensor:
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").eval()
    image = Image.new("RGB", (96, 80), (180, 60, 200))
    return encode_images(encoder, clip_pixels([image], "center"), plus)


def _render(pipe: Any, **kwargs: Any) -> Any:
    generator = torch.Generator().manual_seed(11)
    args = {"prompt": "a cat", "num_inference_steps": 3, "width": 64, "height": 64, "guidance_scale": 5.0}
    return pipe(**{**args, **kwargs}, generator=generator, output_type="np").images


# -- loading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("plus", [False, True])
def test_safetensors_and_bin_load_the_same_adapter(adapters: dict, plus: bool) -> None:
    folder = adapters[("sdxl", plus)]
    a = load_ip_adapter(folder / "ip-adapter.safetensors")
    b = load_ip_adapter(folder / "ip-adapter.bin")
    assert (a.plus, a.cross_dim, a.tokens, len(a.layers)) == (plus, 64, 4, 8)
    assert (b.plus, b.cross_dim, b.tokens, len(b.layers)) == (plus, 64, 4, 8)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a.layers, b.layers, strict=True))
    sa, sb = a.projection.state_dict(), b.projection.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Payload:
    def __reduce__(self) -> tuple:
        import os

        return (os.system, ("touch /tmp/farm-pickle-ran",))


def test_pickled_code_in_a_bin_is_refused_not_run(tmp_path: Path) -> None:
    marker = Path("/tmp/farm-pickle-ran")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.bin"
    torch.save({"image_proj": {"x": _Payload()}, "ip_adapter": {}}, path, pickle_module=pickle)
    with pytest.raises(PatchError, match=r"evil\.bin is not a loadable IP-Adapter checkpoint"):
        load_ip_adapter(path)
    assert not marker.exists()


def test_corrupt_and_foreign_files_are_refused(tmp_path: Path, adapters: dict) -> None:
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((adapters[("sd15", False)] / "ip-adapter.safetensors").read_bytes()[:300])
    with pytest.raises(PatchError, match=r"cut\.safetensors is not a loadable"):
        load_ip_adapter(truncated)
    from safetensors.torch import save_file

    save_file({"unet.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(PatchError, match="not an IP-Adapter checkpoint"):
        load_ip_adapter(tmp_path / "lora.safetensors")
    with pytest.raises(PatchError, match="does not exist"):
        load_ip_adapter(tmp_path / "missing.safetensors")


def test_an_adapter_for_another_family_is_refused(tiny_models: dict, adapters: dict) -> None:
    pipe = _pipe(tiny_models, "sdxl")
    adapter = load_ip_adapter(adapters[("sd15", False)] / "ip-adapter.safetensors")
    prompt = ImagePrompt(torch.zeros(1, 32))
    with pytest.raises(PatchError, match="4 cross-attention layers; this UNet has 8"):
        ModelPatcher(pipe).apply([IPAdapterPatch(adapter, (prompt,))])


# -- against diffusers' native IP-Adapter ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("plus", [False, True])
def test_additive_mode_matches_diffusers_load_ip_adapter(
    tiny_models: dict, adapters: dict, family: str, plus: bool
) -> None:
    folder = adapters[(family, plus)]
    embeds = _embeds(folder, plus)
    zeros = torch.zeros_like(embeds)

    native = _pipe(tiny_models, family)
    native.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    native.set_ip_adapter_scale(0.7)
    expected = _render(native, ip_adapter_image_embeds=[torch.cat([zeros, embeds]).unsqueeze(1)])

    ours = _pipe(tiny_models, family)
    unpatched = _render(ours)
    adapter = load_ip_adapter(folder / "ip-adapter.safetensors")
    handle = ModelPatcher(ours).apply([IPAdapterPatch(adapter, (ImagePrompt(embeds, weight=0.7),))])
    assert len(handle.replaced_processors) == len(adapter.layers)
    got = _render(ours)
    print(f"{family} plus={plus}: max |ours - diffusers| = {abs(got - expected).max():.2e}")
    assert abs(got - expected).max() < TOLERANCE
    assert abs(got - unpatched).max() > 100 * TOLERANCE  # the adapter does something
    handle.remove()
    assert (_render(ours) == unpatched).all()


# -- neutral settings and Fooocus mode -------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(tiny_models: dict, adapters: dict) -> tuple[Any, Any, torch.Tensor, Any]:
    pipe = _pipe(tiny_models, "sdxl")
    folder = adapters[("sdxl", True)]
    return pipe, load_ip_adapter(folder / "ip-adapter.safetensors"), _embeds(folder, True), _render(pipe)


def _with(sdxl: tuple, *prompts: ImagePrompt, mode: str = "additive") -> Any:
    pipe, adapter, _, _ = sdxl
    handle = ModelPatcher(pipe).apply([IPAdapterPatch(adapter, tuple(prompts), mode=mode)])
    try:
        return _render(pipe)
    finally:
        handle.remove()


def test_additive_weight_zero_is_the_unpatched_output_exactly(sdxl: tuple) -> None:
    _, _, embeds, unpatched = sdxl
    assert (_with(sdxl, ImagePrompt(embeds, weight=0.0)) == unpatched).all()


def test_fooocus_weight_zero_is_not_a_no_op_but_stop_zero_is(sdxl: tuple) -> None:
    _, _, embeds, unpatched = sdxl
    # Weight 0 turns the image tokens' logits to 0, not -inf: they still take softmax mass and add
    # their zero-mean values (reference 3.5, point 4). Only the stop fraction removes a prompt.
    assert abs(_with(sdxl, ImagePrompt(embeds, weight=0.0), mode="fooocus") - unpatched).max() > 1e-3
    assert (_with(sdxl, ImagePrompt(embeds, weight=1.0, stop=0.0), mode="fooocus") == unpatched).all()
    assert abs(_with(sdxl, ImagePrompt(embeds, weight=1.0), mode="fooocus") - unpatched).max() > 1e-3


def test_two_prompts_compose_and_order_does_not_matter_in_additive_mode(sdxl: tuple) -> None:
    _, _, embeds, _ = sdxl
    other = embeds.flip(1)
    a = _with(sdxl, ImagePrompt(embeds, weight=0.5), ImagePrompt(other, weight=0.8))
    b = _with(sdxl, ImagePrompt(other, weight=0.8), ImagePrompt(embeds, weight=0.5))
    single = _with(sdxl, ImagePrompt(embeds, weight=0.5))
    assert abs(a - b).max() < 1e-5 and abs(a - single).max() > 1e-3


def test_masks_gate_the_image_branch(sdxl: tuple) -> None:
    _, _, embeds, unpatched = sdxl
    full = _with(sdxl, ImagePrompt(embeds, weight=1.0))
    assert (_with(sdxl, ImagePrompt(embeds, weight=1.0, mask=torch.ones(8, 8))) == full).all()
    assert (_with(sdxl, ImagePrompt(embeds, weight=1.0, mask=torch.zeros(8, 8))) == unpatched).all()
    half = torch.zeros(64, 64)
    half[:, :32] = 1.0
    partial = _with(sdxl, ImagePrompt(embeds, weight=1.0, mask=half))
    assert abs(partial - full).max() > 1e-4 and abs(partial - unpatched).max() > 1e-4
    with pytest.raises(PatchError, match="additive mode only"):
        _with(sdxl, ImagePrompt(embeds, mask=half), mode="fooocus")


def test_start_and_stop_follow_sampling_progress() -> None:
    zeros = torch.zeros(2, 4)
    branch = ImagePromptBranch(zeros, zeros, zeros, zeros, weight=1.0, start=0.25, stop=0.6)
    state = StepState()
    seen = []
    for t in (999, 800, 600, 400, 200, 0):
        state.timestep = float(t)
        seen.append(branch.active(state))
    assert seen == [False, False, True, True, False, False]  # progress 0, .2, .4, .5996, .8, 1
    always = ImagePromptBranch(zeros, zeros, zeros, zeros, start=0.0, stop=1.0)
    state.timestep = 0.0
    assert always.active(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"weight": 6.0}, "outside -1..5"), ({"start": 0.8, "stop": 0.2}, "start <= stop"), ({"stop": 1.5}, "stop <= 1")],
)
def test_image_prompt_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(PatchError, match=message):
        ImagePrompt(torch.zeros(1, 4), **kwargs)


def test_negative_tokens_replace_the_uncond_branch(sdxl: tuple, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from patching.ip_adapter import load_negative

    pipe, adapter, embeds, _ = sdxl
    save_file({"data": torch.randn(1, 4, 64)}, str(tmp_path / "negative.safetensors"))
    negative = load_negative(tmp_path / "negative.safetensors")
    assert negative.shape == (4, 64)
    prompt = (ImagePrompt(embeds, weight=1.0),)

    def render(guidance: float, **kwargs: Any) -> Any:
        handle = ModelPatcher(pipe).apply([IPAdapterPatch(adapter, prompt, **kwargs)])
        try:
            return _render(pipe, guidance_scale=guidance)
        finally:
            handle.remove()

    assert abs(render(5.0, negative=negative) - render(5.0)).max() > 1e-4  # uncond half differs
    assert (render(1.0, negative=negative) == render(1.0)).all()  # no uncond half without CFG
    with pytest.raises(PatchError, match="negative tokens are 8 wide"):
        ModelPatcher(pipe).apply([IPAdapterPatch(adapter, prompt, negative=torch.zeros(4, 8))])


def test_center_crop_preprocessing_matches_clip_image_processor() -> None:
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (150, 300, 3), dtype=np.uint8))
    expected = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})(images=image, return_tensors="pt")
    ours = clip_pixels([image], "center")
    assert ours.shape == expected.pixel_values.shape == (1, 3, 224, 224)
    assert abs(ours - expected.pixel_values).max() < 1e-5  # measured 0.0 with transformers 5 (PIL backend)
    stretched = clip_pixels([image], "stretch")
    assert stretched.shape == (1, 3, 224, 224) and not torch.equal(stretched, ours)
