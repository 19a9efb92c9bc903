"""The refine of an ``upscale`` step with ``method: img2img`` (a hires fix): a Lanczos-enlarged
image denoised again, from ``strength`` of the way, by the diffusers img2img pipeline of the
model's family, built on the resident pipeline the worker's ``ModelCache`` holds (same components:
no second copy of the weights; kept in ``LoadedModel.derived``, so it lives and dies with it).

The noise comes from a CPU generator seeded with the step's ``seed``, as a render's does
(:func:`farm.worker.images.render_image`), so a CPU and a GPU worker start from the same noise; the
pipeline runs on the worker's device and dtype (fp16 on CUDA), chosen when the model was loaded.
The sampler is the one the source image was rendered with (its ``scheduler`` parameter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import diffusers
import torch

from farm.job_spec import JobSpec
from farm.model_registry import IMG2IMG_PIPELINES
from farm.worker.images import StepCallback, set_scheduler, step_callback
from farm.worker.memory import vae_tiling
from farm.worker.shard_run import ShardRun
from farm.worker.step_inputs import SourceOutput, StepInputError

DEFAULT_SCHEDULER = JobSpec.model_fields["scheduler"].default  # a source image that records none


@dataclass(frozen=True)
class RefineRequest:
    """One image's refine: the img2img call's settings."""

    prompt: str
    negative_prompt: str
    seed: int
    strength: float
    steps: int
    guidance: float
    scheduler: str

    @classmethod
    def for_source(cls, spec: Any, source: SourceOutput) -> RefineRequest:
        """The refine of ``source`` by an ``upscale`` spec: its prompt, else the source's own (and
        its negative prompt); the source's sampler."""
        if spec.prompt is not None:
            prompt, negative = spec.prompt, ""
        else:
            prompt, negative = source.params.get("prompt"), source.params.get("negative_prompt") or ""
            if not isinstance(prompt, str) or not prompt:
                raise StepInputError(f"input {source.key}: records no prompt to refine with; give the step a prompt")
        scheduler = source.params.get("scheduler") or DEFAULT_SCHEDULER
        return cls(prompt, str(negative), spec.seed, spec.strength, spec.refine_steps, spec.refine_guidance, scheduler)

    @property
    def denoising_steps(self) -> int:
        """The steps the pipeline runs: the last ``int(steps * strength)`` of the schedule."""
        return min(int(self.steps * self.strength), self.steps)

    def recorded(self) -> dict[str, Any]:
        """What the output records about its refine."""
        return {
            "strength": self.strength,
            "refine_steps": self.steps,
            "refine_guidance": self.guidance,
            "seed": self.seed,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "scheduler": self.scheduler,
        }


def img2img_pipeline(loaded: Any, family: str) -> Any:
    """The img2img pipeline of ``family`` on the resident ``loaded`` model's components."""
    key = ("img2img_pipeline", family)
    if key not in loaded.derived:
        name = IMG2IMG_PIPELINES.get(family)
        if name is None:
            raise StepInputError(f"family {family} has no img2img pipeline; upscale with method lanczos")
        pipe = getattr(diffusers, name).from_pipe(loaded.pipeline)
        pipe.set_progress_bar_config(disable=True)
        loaded.derived[key] = pipe
    return loaded.derived[key]


def refine(pipe: Any, image: Any, request: RefineRequest, on_step: StepCallback | None = None) -> Any:
    """``image`` (a PIL image, already enlarged) refined by the img2img ``pipe``; a PIL image of
    the same size (multiples of 8). ``on_step(step, total)`` runs after every step."""
    set_scheduler(pipe, request.scheduler)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    with torch.inference_mode():
        result = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            image=image,
            strength=request.strength,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=generator,
            output_type="pil",
            callback_on_step_end=step_callback(on_step, request.denoising_steps),
        )
    return result.images[0]


class Refiner:
    """The img2img refine of one shard: the pipeline built once on the resident model."""

    def __init__(self, run: ShardRun) -> None:
        self.run = run
        self.pipe = img2img_pipeline(run.loaded, run.spec.family)

    def apply(self, image: Any, source: Any, position: int, count: int) -> tuple[Any, dict[str, Any]]:
        """``image`` refined, and what its output records of the refine (with the model)."""
        run = self.run
        factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        if image.width % factor or image.height % factor:
            raise StepInputError(
                f"input {source.key}: upscaled to {image.width}x{image.height}, which img2img cannot keep "
                f"(width and height must be multiples of {factor}); use method lanczos or another scale"
            )
        request = RefineRequest.for_source(run.spec, source)

        def on_step(step: int, steps: int) -> None:
            run.progress(0.99 * (position + step / steps) / count)

        started = time.perf_counter()
        with vae_tiling(self.pipe, bool(run.memory.get("vae_tiling"))):
            refined = refine(self.pipe, image, request, on_step)
        run.add_time("denoise_s", time.perf_counter() - started)
        return refined, {**request.recorded(), "model": run.spec.model, "model_hash": run.loaded.model_hash}
