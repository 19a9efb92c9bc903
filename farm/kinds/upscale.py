"""The ``upscale`` step: every image of the source job (stills and video frames) enlarged by
``scale``, as PNG beside the source's outputs, under the source image's name.

``method: lanczos`` (the default) enlarges with a Lanczos filter on the CPU (``farm.cpu``).
``method: img2img`` is the "hires fix" of A1111 and ComfyUI: each image is enlarged with Lanczos,
then refined by the diffusers img2img pipeline of the source job's family
(``StableDiffusionImg2ImgPipeline`` for sd15, ``StableDiffusionXLImg2ImgPipeline`` for sdxl),
built on the worker's resident pipeline of the source job's model (no second copy of the weights),
on that family's GPU queue. At submit (:func:`farm.steps.resolve_step`) the step takes the source
job's ``model`` and ``family`` (a ``model`` given must be of the source's family); a source of
family ``svd`` (no img2img pipeline) or a source that is itself a step is refused, naming
``method``. The refine's settings, each refused with ``method: lanczos``:

- ``strength`` (0 < s <= 1, default 0.3): how much of the noise schedule is run again;
- ``refine_steps`` (default 20; ``int(refine_steps * strength)`` steps are run, at least 1) and
  ``refine_guidance`` (default 5.0): named apart from a render's ``steps`` and ``guidance``, which
  a step takes none of;
- ``prompt`` (default: the prompt each source image was rendered with, and its negative prompt);
- ``seed`` (default 0): the refine's noise, the same for every image.

The source job's patches and LoRAs are not applied (a step has none). ``parts`` splits the work
into that many shards (part ``p`` takes the source's images at positions ``p, p + parts, ...`` in
key order), so several workers share it. An output larger than ``max_pixels`` (width x height)
is refused. The runner is :mod:`farm.worker.kinds.upscale`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from farm.families import CPU_FAMILY
from farm.job_spec import MAX_MODEL_CHARS, Prompt, Seed, check_model_ref
from farm.kinds.base import ShardRunner
from farm.kinds.step import StepSpec, step_kind
from farm.model_registry import IMG2IMG_PIPELINES
from farm.spec_problems import problem

MAX_PIXELS = 4096 * 4096  # the largest upscaled image, width x height
MAX_PARTS = 64
REFINE_FAMILIES = tuple(IMG2IMG_PIPELINES)  # the families with a diffusers img2img pipeline
# The img2img settings: refused with method lanczos; their defaults filled in for img2img (so the
# stored spec states them).
IMG2IMG_DEFAULTS: dict[str, Any] = {"strength": 0.3, "refine_steps": 20, "refine_guidance": 5.0, "seed": 0}
IMG2IMG_FIELDS = ("strength", "refine_steps", "refine_guidance", "prompt", "seed")


class UpscaleSpec(StepSpec):
    """Images of ``source_job`` enlarged ``scale`` times (Lanczos), then refined with the source's
    model when ``method`` is ``img2img``."""

    families: ClassVar[tuple[str, ...]] = (CPU_FAMILY, *REFINE_FAMILIES)

    kind: Literal["upscale"] = "upscale"
    model: str = Field(
        default="",
        max_length=MAX_MODEL_CHARS,
        description="img2img: the refining model, of the source job's family (default, set at submit: the "
        "source job's model); none with lanczos",
    )
    family: Literal["cpu", "sd15", "sdxl"] = Field(
        default=CPU_FAMILY, description="set at submit: the source job's family with img2img; cpu with lanczos"
    )
    scale: int = Field(default=2, ge=2, le=4, description="enlargement factor of width and height")
    parts: int = Field(default=1, ge=1, le=MAX_PARTS, description="shards the images are split into")
    max_pixels: int = Field(
        default=MAX_PIXELS, ge=1, le=MAX_PIXELS, description="largest output (width x height) accepted"
    )
    method: Literal["lanczos", "img2img"] = Field(
        default="lanczos",
        description="lanczos: on the CPU; img2img: Lanczos, then refined by the source model's img2img pipeline "
        "on its family's GPU queue (a hires fix)",
    )
    strength: float | None = Field(
        default=None, gt=0.0, le=1.0, description="img2img: how much the refine changes the image (default 0.3)"
    )
    refine_steps: int | None = Field(
        default=None, ge=1, le=150, description="img2img: denoising steps before strength (default 20)"
    )
    refine_guidance: float | None = Field(
        default=None, ge=0.0, le=30.0, description="img2img: classifier-free guidance scale (default 5.0)"
    )
    prompt: Prompt | None = Field(
        default=None, description="img2img: the refine's prompt (default: each source image's own prompt)"
    )
    seed: Seed | None = Field(default=None, description="img2img: the refine's noise seed (default 0)")

    @model_validator(mode="before")
    @classmethod
    def _img2img_settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("method") == "img2img":
            return {**data, **{name: value for name, value in IMG2IMG_DEFAULTS.items() if data.get(name) is None}}
        if data.get("method", "lanczos") == "lanczos":
            for name in IMG2IMG_FIELDS:
                if data.get(name) is not None:
                    reason = f"'{name}' is a setting of method img2img (lanczos runs no model); remove it"
                    reason += " or set method: img2img"
                    raise problem((name,), reason, data[name])
        return data

    @classmethod
    def render_fields_taken(cls, data: dict[str, Any]) -> tuple[str, ...]:
        return ("model", "family") if data.get("method") == "img2img" else ()

    @classmethod
    def render_field_refused(cls, name: str) -> str:
        if name in ("model", "family"):
            return f"upscale with method lanczos loads no model and takes no '{name}'; remove it or set method: img2img"
        return ""

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:  # img2img may name one (lanczos: refused above)
        return check_model_ref(value) if value else value

    @model_validator(mode="after")
    def _refine_runs_a_step(self) -> UpscaleSpec:
        if self.method == "img2img":
            assert self.strength is not None and self.refine_steps is not None  # filled in above
            if int(self.refine_steps * self.strength) < 1:
                reason = (
                    f"refine_steps x strength ({self.refine_steps} x {self.strength}) is under one denoising step; "
                    "raise refine_steps or strength"
                )
                raise problem(("refine_steps",), reason, self.refine_steps)
        return self

    def part_count(self) -> int:
        return self.parts

    def runs_model(self) -> bool:
        """``img2img`` refines with the source job's model (on its family's GPU queue)."""
        return self.method == "img2img"


def runner() -> ShardRunner:
    from farm.worker.kinds.upscale import run_upscale_shard  # worker side

    return run_upscale_shard


KIND = step_kind(UpscaleSpec, runner)
