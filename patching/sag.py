"""Self-Attention Guidance (SAG) as a reversible patch on SD1.x / SDXL pipelines.

The maths is ComfyUI's ``SelfAttentionGuidance`` node (reference ``patch_semantics.md`` 4),
carried out on a diffusers pipeline without changing the pipeline's code:

1. **Record.** The middle block's first self-attention
   (``mid_block.attentions[0].transformer_blocks[0].attn1``) gets a processor that, on a UNet
   call whose batch holds an uncond chunk, computes that one layer without the fused kernel and
   keeps the uncond chunk's attention reduced to what the mask needs: the mean over heads summed
   over the query axis, ``(b, N)`` per key token. Every other call of that layer, and every other
   layer, keeps its processor (the fast path). A forward pre-hook on the middle transformer
   records its exact token grid (odd latent sizes give grids like 5 x 6; nothing is guessed).
2. **Guide.** A UNet forward hook takes each pipeline UNet call's output ``[uncond, cond]`` and:
   builds the mask (key tokens that receive more than average attention, threshold 1.0,
   nearest-upsampled to the latent grid); blurs the uncond ``x0`` estimate with a 9-tap Gaussian
   of ``blur_sigma`` where the mask is set; re-noises it to the call's noise level with the uncond
   noise estimate; runs the UNet again on the uncond conditioning; and adds
   ``scale * (x0_blurred - D(x_degraded))`` in ``x0`` terms, converted to the UNet's prediction
   type. For epsilon models that is ``scale * (eps_uncond - eps_degraded)``: diffusers'
   ``StableDiffusionSAGPipeline`` update. The same change is added to every chunk, so after the
   pipeline's classifier-free guidance the result is ``cfg + scale * (...)`` for any guidance.
3. **Without CFG** (guidance <= 1, where diffusers runs the cond batch only) the hook runs the
   uncond pass itself, as ComfyUI does: the uncond text embedding comes from the running
   pipeline's ``encode_prompt`` with ``negative_prompt`` (computed once per applied set).

The UNet input of every scheduler the farm offers is the variance-preserving sample ``x_t``
(sigma-space schedulers scale it in ``scale_model_input``), so ``x0`` and the re-noising use
``alphas_cumprod`` at the call's timestep (interpolated in sigma for fractional timesteps) and
work for DDIM, PNDM, Euler, Heun, LMS, DPM-Solver and UniPC alike. ``scale == 0`` leaves the
model untouched; latents smaller than 5 x 5 are left unguided (the blur's reflect padding needs
more), as in ComfyUI. ``blur_sigma == 0`` means no blur.

Where diffusers' ``StableDiffusionSAGPipeline`` differs (we follow ComfyUI): its blur sigma is
fixed at 1.0; without CFG it guides with the cond attention and prediction instead of running an
uncond pass; for v-prediction models it adds ``scale * (v_uncond - v_degraded)``, which is not the
``x0``-space change (the two differ by ``scale * sqrt(1 - alpha) * (x0_uncond - x0_blurred)``);
and its re-noising is only right for schedulers whose UNet input is unscaled. With epsilon models,
CFG and DDIM the two agree to float rounding (``tests/test_sag.py``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from patching.errors import PatchError
from patching.patcher import Patch, PatchContext
from patching.state import UNCOND, StepState

MIDDLE_ATTENTION = "unet.mid_block.attentions.0.transformer_blocks.0.attn1"
MIDDLE_TRANSFORMER = "mid_block.attentions.0"
THRESHOLD = 1.0
KERNEL_SIZE = 9
SCALE_RANGE = (-2.0, 5.0)  # the seed node's ranges
BLUR_SIGMA_RANGE = (0.0, 10.0)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# -- maths ----------------------------------------------------------------------------------------
def gaussian_blur(images: torch.Tensor, sigma: float, kernel_size: int = KERNEL_SIZE) -> torch.Tensor:
    """``(B, C, H, W)`` blurred per channel with a normalised ``kernel_size``-tap Gaussian of
    ``sigma`` (separable, reflect padding). ``sigma == 0`` returns the input."""
    if sigma == 0:
        return images
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, dtype=torch.float32)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=images.device, dtype=images.dtype)
    channels = images.shape[1]
    pad = kernel_size // 2
    out = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, weights.view(1, 1, 1, -1).expand(channels, 1, 1, kernel_size), groups=channels)
    return F.conv2d(out, weights.view(1, 1, -1, 1).expand(channels, 1, kernel_size, 1), groups=channels)


def blur_mask(key_mass: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``(b, 1, H, W)`` in {0, 1}: the key tokens whose attention mass (``(b, N)``, head mean
    summed over queries) exceeds the threshold, on the ``grid`` they came from, nearest-upsampled
    to the latent ``size``."""
    b, tokens = key_mass.shape
    if tokens != grid[0] * grid[1]:
        raise RuntimeError(f"SAG: {tokens} attention tokens do not fill the {grid[0]}x{grid[1]} middle grid")
    mask = (key_mass > THRESHOLD).to(torch.float32).view(b, 1, *grid)
    return F.interpolate(mask, size=size, mode="nearest")


def alpha_bar(scheduler: Any, timestep: float) -> torch.Tensor:
    """``alphas_cumprod`` at ``timestep`` (a 0-d fp32 tensor): the entry itself for whole
    timesteps, else from the training sigmas interpolated linearly (as sigma-space schedulers
    place fractional timesteps)."""
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise PatchError(f"SAG needs a scheduler with alphas_cumprod; {type(scheduler).__name__} has none")
    table = table.to(torch.float32).cpu()
    if float(timestep).is_integer() and 0 <= timestep < len(table):
        return table[int(timestep)]
    sigmas = ((1 - table) / table) ** 0.5
    position = min(max(float(timestep), 0.0), len(table) - 1.0)
    low = math.floor(position)
    high = min(low + 1, len(table) - 1)
    sigma = sigmas[low] + (position - low) * (sigmas[high] - sigmas[low])
    return 1.0 / (1.0 + sigma**2)


def predicted_x0(sample: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, prediction: str) -> torch.Tensor:
    beta = 1 - alpha
    if prediction == "epsilon":
        return (sample - beta**0.5 * output) / alpha**0.5
    if prediction == "v_prediction":
        return alpha**0.5 * sample - beta**0.5 * output
    return output


def predicted_noise(sample: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, prediction: str) -> torch.Tensor:
    beta = 1 - alpha
    if prediction == "epsilon":
        return output
    if prediction == "v_prediction":
        return beta**0.5 * sample + alpha**0.5 * output
    return (sample - alpha**0.5 * output) / beta**0.5


def output_change(x0_change: torch.Tensor, alpha: torch.Tensor, prediction: str) -> torch.Tensor:
    """The change of the UNet's output that moves its ``x0`` estimate by ``x0_change`` at a fixed
    sample (``x0`` is affine in the output)."""
    beta = 1 - alpha
    if prediction == "epsilon":
        return -(alpha**0.5) / beta**0.5 * x0_change
    if prediction == "v_prediction":
        return -x0_change / beta**0.5
    return x0_change


# -- runtime --------------------------------------------------------------------------------------
@dataclass(eq=False)
class _GuidanceRun:
    """What one applied SAG set shares between its processor and hooks."""

    state: StepState
    grid: tuple[int, int] | None = None  # the middle transformer's token grid, last call
    key_mass: torch.Tensor | None = None  # (b, N) of the last recording; taken once per call
    recorded_grid: tuple[int, int] | None = None
    want_map: bool = True  # False during the degraded pass: the layer keeps the fast path
    inside: bool = False  # True while the hook runs its own UNet passes
    uncond: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    guided_calls: int = 0
    recordings: int = 0

    def take_map(self) -> tuple[torch.Tensor, tuple[int, int]]:
        mass, grid = self.key_mass, self.recorded_grid
        self.key_mass = self.recorded_grid = None
        if mass is None or grid is None:
            raise RuntimeError("SAG: no self-attention map was recorded for this UNet call")
        return mass, grid

    @contextlib.contextmanager
    def own_pass(self, *, record: bool):
        """A UNet call made by the hook: the whole batch is uncond."""
        saved = self.state.forced_layout, self.want_map
        self.state.forced_layout, self.want_map = [UNCOND], record
        try:
            yield
        finally:
            self.state.forced_layout, self.want_map = saved


class MiddleAttentionRecorder:
    """Processor for the middle block's first self-attention: records the uncond chunk's
    attention mass when a map is wanted, otherwise hands the call to the processor it replaced."""

    def __init__(self, previous: Any, run: _GuidanceRun) -> None:
        self.previous = previous
        self.run = run

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        layout = self.run.state.cond_or_uncond
        batch = hidden_states.shape[0]
        if not self.run.want_map or UNCOND not in layout or batch % len(layout):
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        tokens = hidden_states.shape[1]
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, mask)  # (batch * heads, N, N)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        per_chunk = batch // len(layout)
        first = layout.index(UNCOND) * per_chunk
        uncond = probs.view(batch, attn.heads, tokens, -1)[first : first + per_chunk]
        self.run.key_mass = uncond.to(torch.float32).mean(dim=1).sum(dim=1)
        self.run.recorded_grid = self.run.grid
        self.run.recordings += 1
        return out / attn.rescale_output_factor


def _batch_slice(value: Any, batch: int, start: int, size: int) -> Any:
    """``value`` with every tensor whose first axis is the batch cut to ``[start, start+size)``."""
    if isinstance(value, torch.Tensor):
        return value[start : start + size] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _batch_slice(v, batch, start, size) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_batch_slice(v, batch, start, size) for v in value)
    return value


def _uncond_embeddings(run: _GuidanceRun, pipeline: Any, negative_prompt: str, like: torch.Tensor) -> tuple:
    """(text embeddings, pooled embeddings or None) of the uncond prompt, as the pipeline makes
    them for classifier-free guidance; computed once per applied set, device and dtype."""
    key = (id(pipeline), like.device, like.dtype)
    if key not in run.uncond:
        encode = getattr(pipeline, "encode_prompt", None)
        if encode is None:
            raise PatchError("SAG without classifier-free guidance needs a pipeline with encode_prompt")
        encoded = encode(
            prompt="",
            device=like.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None,
        )
        pooled = encoded[3] if len(encoded) == 4 else None  # SDXL: (embeds, neg, pooled, neg pooled)
        run.uncond[key] = (encoded[1].to(like.dtype), None if pooled is None else pooled.to(like.dtype))
    return run.uncond[key]


def _uncond_call(run: _GuidanceRun, pipeline: Any, negative_prompt: str, kwargs: dict, batch: int) -> dict:
    """The UNet kwargs of a cond-only batch turned into the uncond conditioning."""
    context = kwargs["encoder_hidden_states"]
    embeds, pooled = _uncond_embeddings(run, pipeline, negative_prompt, context)
    call = {**kwargs, "encoder_hidden_states": embeds.expand(batch, -1, -1)}
    added = kwargs.get("added_cond_kwargs")
    if pooled is not None and isinstance(added, dict) and "text_embeds" in added:
        call["added_cond_kwargs"] = {**added, "text_embeds": pooled.expand(batch, -1)}
    return call


@dataclass(frozen=True)
class SelfAttentionGuidance(Patch):
    """ComfyUI's ``SelfAttentionGuidance``: ``scale`` in -2..5 (0 = off), ``blur_sigma`` in 0..10.
    ``negative_prompt`` is the uncond text used when the pipeline runs without classifier-free
    guidance (with it, the pipeline's own uncond batch is used)."""

    name: ClassVar[str] = "self_attention_guidance"
    scale: float = 0.5
    blur_sigma: float = 2.0
    negative_prompt: str = ""

    def apply(self, ctx: PatchContext) -> None:
        low, high = SCALE_RANGE
        if not low <= self.scale <= high:
            raise PatchError(f"{self.name}: scale {self.scale} is outside {low}..{high}")
        low, high = BLUR_SIGMA_RANGE
        if not low <= self.blur_sigma <= high:
            raise PatchError(f"{self.name}: blur_sigma {self.blur_sigma} is outside {low}..{high}")
        if self.scale == 0.0:
            return  # the unpatched model, bit for bit
        unet = ctx.unet
        if type(unet).__name__ != "UNet2DConditionModel":
            raise PatchError(f"{self.name} applies to SD1.x / SDXL UNets, not {type(unet).__name__}")
        attn = ctx.module(MIDDLE_ATTENTION)  # a PatchError naming it when the middle block has no attention
        extras = ("spatial_norm", "group_norm", "norm_q", "norm_k")
        if any(getattr(attn, name, None) is not None for name in extras) or getattr(attn, "residual_connection", False):
            raise PatchError(f"{self.name}: {MIDDLE_ATTENTION} is not a plain self-attention")
        run = _GuidanceRun(ctx.state)
        ctx.replace_processor(MIDDLE_ATTENTION, lambda previous: MiddleAttentionRecorder(previous, run))

        def grid_hook(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            run.grid = (int(hidden.shape[-2]), int(hidden.shape[-1]))

        def guide_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            return None if run.inside else self._guide(run, module, args, kwargs, output)

        def install() -> Any:
            grid = unet.get_submodule(MIDDLE_TRANSFORMER).register_forward_pre_hook(grid_hook, with_kwargs=True)
            guide = unet.register_forward_hook(guide_hook, with_kwargs=True)

            def undo() -> None:
                guide.remove()
                grid.remove()
                run.uncond.clear()
                run.key_mass = None

            return undo

        ctx.install(install)

    def _guide(self, run: _GuidanceRun, unet: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        state = run.state
        sample = args[0] if args else kwargs["sample"]
        prediction_out = output[0] if isinstance(output, tuple) else output.sample
        height, width = sample.shape[-2:]
        layout = list(state.cond_or_uncond) or [0]
        batch = sample.shape[0]
        if min(height, width) <= KERNEL_SIZE // 2 or batch % len(layout):
            run.key_mass = None
            return None
        pipeline = state.pipeline_ref()
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None or state.timestep is None:
            raise PatchError(f"{self.name} needs the running pipeline's scheduler")
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise PatchError(f"{self.name}: unknown prediction type {prediction!r}")
        # The UNet's own kwargs (timestep included), everything positional after the sample moved in.
        names = ("timestep", "encoder_hidden_states")
        call = {**dict(zip(names, args[1:], strict=False)), **kwargs, "return_dict": False}
        call.pop("sample", None)
        per_chunk = batch // len(layout)
        run.inside = True
        try:
            if UNCOND in layout:
                first = layout.index(UNCOND) * per_chunk
                x = sample[first : first + per_chunk]
                out_uncond = prediction_out[first : first + per_chunk]
                call = _batch_slice(call, batch, first, per_chunk)
                key_mass, grid = run.take_map()
            else:  # no CFG in this call: run the uncond pass here, recording its attention
                x = sample
                call = _uncond_call(run, pipeline, self.negative_prompt, call, batch)
                with run.own_pass(record=True):
                    out_uncond = unet(x, **call)[0]
                key_mass, grid = run.take_map()
            alpha = alpha_bar(scheduler, state.timestep).to(x.device)
            x32, out32 = x.to(torch.float32), out_uncond.to(torch.float32)
            x0 = predicted_x0(x32, out32, alpha, prediction)
            mask = blur_mask(key_mass.to(x.device), grid, (height, width))
            del key_mass
            degraded = gaussian_blur(x0, self.blur_sigma) * mask + x0 * (1 - mask)
            noised = alpha**0.5 * degraded + (1 - alpha) ** 0.5 * predicted_noise(x32, out32, alpha, prediction)
            with run.own_pass(record=False):
                out_degraded = unet(noised.to(sample.dtype), **call)[0].to(torch.float32)
        finally:
            run.inside = False
        if prediction == "epsilon":  # the same change, in diffusers' form
            change = self.scale * (out32 - out_degraded)
        else:
            x0_degraded = predicted_x0(noised, out_degraded, alpha, prediction)
            change = output_change(self.scale * (degraded - x0_degraded), alpha, prediction)
        guided = prediction_out + change.to(prediction_out.dtype).repeat(len(layout), 1, 1, 1)
        run.guided_calls += 1
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output
