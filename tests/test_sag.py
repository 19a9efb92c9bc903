"""Self-Attention Guidance: agreement with diffusers' StableDiffusionSAGPipeline, neutral scale,
exact unpatch, odd latent sizes, SDXL, guidance 1, every farm scheduler, composition with the
other patches, and the recorded map released every step. Tiny models only."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from farm.job_spec import SCHEDULERS  # noqa: E402
from farm.tiny_components import build_tiny_ip_adapter  # noqa: E402
from farm.worker.images import set_scheduler  # noqa: E402
from patching import ModelPatcher, PatchError, UNetSelfAttentionMultiply  # noqa: E402
from patching import sag as sag_module  # noqa: E402
from patching.ip_adapter import ImagePrompt, IPAdapterPatch, load_ip_adapter  # noqa: E402
from patching.sag import SelfAttentionGuidance, gaussian_blur  # noqa: E402

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# Ours and diffusers' SAG differ only in the order of float operations (a separable blur, the
# guidance change added to both CFG chunks before the pipeline combines them): ~1e-5 on decoded
# images in 0..1 after 4 DDIM steps.
TOLERANCE = 1e-4


def _pipe(tiny_models: dict[str, Path], family: str, scheduler: str = "ddim") -> Any:
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(tiny_models[family])
    set_scheduler(pipe, scheduler)  # as the farm's renderer does
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe: Any, **kwargs: Any) -> np.ndarray:
    args = {"prompt": "a cat", "num_inference_steps": 4, "width": 64, "height": 64, "guidance_scale": 7.5}
    generator = torch.Generator().manual_seed(3)
    return pipe(**{**args, **kwargs}, generator=generator, output_type="np").images


def _recorder(pipe: Any) -> Any:
    return pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor


@pytest.fixture
def masks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The fraction of each blur mask that is set, for every guided UNet call."""
    seen: list[float] = []
    original = sag_module.blur_mask

    def spy(*args: Any) -> Any:
        mask = original(*args)
        seen.append(float(mask.mean()))
        return mask

    monkeypatch.setattr(sag_module, "blur_mask", spy)
    return seen


@pytest.mark.parametrize("size", [(64, 64), (72, 88)], ids=["64x64", "72x88"])
def test_matches_diffusers_sag_pipeline(tiny_models: dict, size: tuple[int, int], masks: list[float]) -> None:
    """ComfyUI's formula in x0 space equals diffusers' epsilon-space update for epsilon models;
    with diffusers' fixed blur (sigma 1.0), DDIM and the same seed the images agree."""
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    pipe = _pipe(tiny_models, "sd15")
    width, height = size
    reference_pipe = StableDiffusionSAGPipeline(**pipe.components, requires_safety_checker=False)
    reference_pipe.set_progress_bar_config(disable=True)
    reference = _render(reference_pipe, sag_scale=0.75, width=width, height=height)
    unguided = _render(pipe, width=width, height=height)

    handle = ModelPatcher(pipe).apply([SelfAttentionGuidance(scale=0.75, blur_sigma=1.0)])
    ours = _render(pipe, width=width, height=height)
    handle.remove()

    assert np.abs(reference - unguided).max() > 0.05  # the guidance does something
    assert np.abs(ours - reference).max() < TOLERANCE
    assert len(masks) == 4 and any(0.0 < m < 1.0 for m in masks)  # masks select some tokens, not all


def _comfy_sag_euler(pipe: Any, scale: float, blur_sigma: float, steps: int, guidance: float) -> np.ndarray:
    """An independent reference: ComfyUI's node written out in k-diffusion terms (denoiser
    D(x, sigma), post-CFG in x0 space, re-noising as ``x0_blurred + (x - x0_uncond)``) with an
    Euler sampler, diffusers' attention store and blur; no code of :mod:`patching.sag`."""
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        CrossAttnStoreProcessor,
        gaussian_blur_2d,
    )

    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(steps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    cond, uncond = pipe.encode_prompt("a cat", torch.device("cpu"), 1, True)
    store = CrossAttnStoreProcessor()
    attn1 = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    previous, attn1.processor = attn1.processor, store
    grid: list[tuple[int, int]] = []
    hook = unet.mid_block.attentions[0].register_forward_hook(lambda m, i, o: grid.append(tuple(o[0].shape[-2:])))

    def denoise(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = unet(x / (sigma**2 + 1) ** 0.5, t, encoder_hidden_states=context).sample
        if v_prediction:
            return x / (sigma**2 + 1) + out * (-sigma / (sigma**2 + 1) ** 0.5)
        return x - sigma * out

    generator = torch.Generator().manual_seed(3)
    x = torch.randn((1, 4, 32, 32), generator=generator) * scheduler.init_noise_sigma
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
            x0_u, x0_c = denoise(torch.cat([x, x]), sigma, t, torch.cat([uncond, cond])).chunk(2)
            probs = store.attention_probs.chunk(2)[0]
            heads, tokens = attn1.heads, probs.shape[-1]
            mass = probs.reshape(1, heads, tokens, tokens).mean(1).sum(1)
            mask = (mass > 1.0).float().reshape(1, 1, *grid[-1])
            mask = torch.nn.functional.interpolate(mask, x.shape[-2:])
            degraded = gaussian_blur_2d(x0_u, 9, blur_sigma) * mask + x0_u * (1 - mask)
            x0_cfg = x0_u + guidance * (x0_c - x0_u)
            x0 = x0_cfg + scale * (degraded - denoise(degraded + x - x0_u, sigma, t, uncond))
            x = x + (x - x0) / sigma * (sigma_next - sigma)
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    hook.remove()
    attn1.processor = previous
    return pipe.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_matches_comfyui_formula_with_euler(tiny_models: dict, prediction: str) -> None:
    """Euler's fractional timesteps and both prediction types against the k-diffusion reference."""
    pipe = _pipe(tiny_models, "sd15", "euler")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    reference = _comfy_sag_euler(pipe, scale=0.8, blur_sigma=2.0, steps=4, guidance=6.0)
    unguided = _render(pipe, guidance_scale=6.0)
    ModelPatcher(pipe).apply([SelfAttentionGuidance(scale=0.8, blur_sigma=2.0)])
    ours = _render(pipe, guidance_scale=6.0)
    assert np.abs(reference - unguided).max() > 0.05
    assert np.abs(ours - reference).max() < TOLERANCE


def test_scale_zero_is_the_unpatched_pipeline(tiny_models: dict) -> None:
    pipe = _pipe(tiny_models, "sd15")
    base = _render(pipe)
    handle = ModelPatcher(pipe).apply([SelfAttentionGuidance(scale=0.0, blur_sigma=2.0)])
    assert handle.replaced_processors == [] and not pipe.unet._forward_hooks
    assert np.array_equal(_render(pipe), base)


def test_remove_restores_processors_hooks_and_output(tiny_models: dict) -> None:
    pipe = _pipe(tiny_models, "sd15", "euler")
    processors = dict(pipe.unet.attn_processors)
    base = _render(pipe)
    patcher = ModelPatcher(pipe)
    handle = patcher.apply([SelfAttentionGuidance()])
    guided = _render(pipe)
    assert handle.replaced_processors == ["unet.mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert _recorder(pipe).run.guided_calls == 4 and _recorder(pipe).run.recordings == 4
    handle.remove()
    assert pipe.unet.attn_processors == processors
    assert not pipe.unet._forward_hooks and not pipe.unet.mid_block.attentions[0]._forward_pre_hooks
    assert patcher.state.forced_layout is None
    assert np.abs(guided - base).max() > 0.01
    assert np.array_equal(_render(pipe), base)


def test_odd_latent_sizes_use_the_exact_middle_grid(tiny_models: dict, masks: list[float]) -> None:
    """A 9x11 latent (72x88 pixels on a real SD VAE; the tiny VAE scales by 2, so the latents are
    given): the tiny UNet downsamples once with padding, so the middle grid is 5x6."""
    pipe = _pipe(tiny_models, "sd15", "dpmpp_2m")
    latents = torch.randn(1, 4, 9, 11, generator=torch.Generator().manual_seed(8))
    base = _render(pipe, latents=latents)
    ModelPatcher(pipe).apply([SelfAttentionGuidance(scale=1.0)])
    guided = _render(pipe, latents=latents)
    assert _recorder(pipe).run.grid == (5, 6)
    assert guided.shape == base.shape == (1, 18, 22, 3)
    assert np.isfinite(guided).all() and np.abs(guided - base).max() > 0.01
    assert len(masks) == 4 and any(0.0 < m < 1.0 for m in masks)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_guidance_one_runs_the_uncond_pass(tiny_models: dict, family: str) -> None:
    """Without CFG the hook runs the uncond pass itself (3 UNet calls per step) with the uncond
    embedding the pipeline would use for CFG; the result equals the CFG path at guidance 1
    (diffusers only runs CFG above 1, so 1 + 1e-6 stands in for it)."""
    pipe = _pipe(tiny_models, family)
    patcher = ModelPatcher(pipe)
    base = _render(pipe, guidance_scale=1.0, negative_prompt="blurry")
    patcher.apply([SelfAttentionGuidance(scale=1.5, negative_prompt="blurry")])
    no_cfg = _render(pipe, guidance_scale=1.0, negative_prompt="blurry")
    assert patcher.state.unet_calls == 3 * 4
    cfg = _render(pipe, guidance_scale=1.0 + 1e-6, negative_prompt="blurry")
    assert np.abs(no_cfg - base).max() > 0.01
    assert np.abs(no_cfg - cfg).max() < TOLERANCE


def test_sdxl_with_cfg_and_an_odd_size(tiny_models: dict, masks: list[float]) -> None:
    pipe = _pipe(tiny_models, "sdxl", "euler_a")
    base = _render(pipe, width=72, height=64, guidance_scale=5.0)
    ModelPatcher(pipe).apply([SelfAttentionGuidance(scale=0.5, blur_sigma=2.0)])
    guided = _render(pipe, width=72, height=64, guidance_scale=5.0)
    assert _recorder(pipe).run.grid == (16, 18)  # latent 32x36, one downsample
    assert np.isfinite(guided).all() and np.abs(guided - base).max() > 0.01
    assert len(masks) == 4


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_farm_scheduler(tiny_models: dict, scheduler: str) -> None:
    """Each UNet call the pipeline makes is guided once (Heun makes two per step)."""
    pipe = _pipe(tiny_models, "sd15", scheduler)
    base = _render(pipe, num_inference_steps=3)
    patcher = ModelPatcher(pipe)
    patcher.apply([SelfAttentionGuidance(scale=0.8)])
    guided = _render(pipe, num_inference_steps=3)
    run = _recorder(pipe).run
    assert run.guided_calls == patcher.state.unet_calls // 2 >= 3
    assert np.isfinite(guided).all() and np.abs(guided - base).max() > 0.001


def test_composes_with_ip_adapter_and_multipliers(tiny_models: dict, tmp_path: Path) -> None:
    """SAG in one set with IP-Adapter and an attention multiplier: order does not matter (they
    touch other layers), SAG changes the IP-Adapter result, and remove restores the model."""
    pipe = _pipe(tiny_models, "sd15")
    adapter = load_ip_adapter(build_tiny_ip_adapter("sd15", tmp_path / "ip") / "ip-adapter.safetensors")
    width = next(adapter.projection.parameters()).shape[1]  # the plain projection: (out, image embedding)
    embeds = torch.randn(1, width, generator=torch.Generator().manual_seed(5))
    ip = IPAdapterPatch(adapter, (ImagePrompt(embeds, weight=0.8),), mode="additive")
    multiply = UNetSelfAttentionMultiply(q=1.1, out=0.9)
    sag = SelfAttentionGuidance(scale=0.75)
    patcher = ModelPatcher(pipe)
    base = _render(pipe)
    images = {}
    for name, patches in {"ip": [multiply, ip], "ip+sag": [multiply, ip, sag], "sag+ip": [sag, multiply, ip]}.items():
        patcher.ensure(patches)
        images[name] = _render(pipe)
    patcher.remove()
    assert np.array_equal(images["ip+sag"], images["sag+ip"])
    assert np.abs(images["ip+sag"] - images["ip"]).max() > 0.01
    assert np.array_equal(_render(pipe), base)


def test_recorded_map_is_released_after_each_step(tiny_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[weakref.ref] = []
    original = sag_module._GuidanceRun.take_map

    def spy(self: Any) -> Any:
        mass, grid = original(self)
        taken.append(weakref.ref(mass))
        return mass, grid

    monkeypatch.setattr(sag_module._GuidanceRun, "take_map", spy)
    pipe = _pipe(tiny_models, "sd15")
    ModelPatcher(pipe).apply([SelfAttentionGuidance()])
    checked: list[int] = []

    def on_step(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        assert _recorder(pipeline).run.key_mass is None
        assert taken and all(ref() is None for ref in taken)
        checked.append(step)
        return kwargs

    _render(pipe, callback_on_step_end=on_step)
    assert checked == [0, 1, 2, 3] and len(taken) == 4


def test_gaussian_blur_keeps_constants_and_sigma_zero_is_identity() -> None:
    flat = torch.full((1, 4, 9, 11), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    noisy = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(1))
    assert gaussian_blur(noisy, 0.0) is noisy
    blurred = gaussian_blur(noisy, 3.0)
    assert blurred.shape == noisy.shape and blurred.std() < noisy.std()


def test_bad_settings_and_models_are_refused(tiny_models: dict) -> None:
    pipe = _pipe(tiny_models, "sd15")
    for bad, field in [(SelfAttentionGuidance(scale=6.0), "scale"), (SelfAttentionGuidance(blur_sigma=-1), "blur")]:
        with pytest.raises(PatchError, match=field):
            ModelPatcher(pipe).apply([bad])
    svd = diffusers.StableVideoDiffusionPipeline.from_pretrained(tiny_models["svd"])
    with pytest.raises(PatchError, match=r"SD1\.x / SDXL"):
        ModelPatcher(svd).apply([SelfAttentionGuidance()])
