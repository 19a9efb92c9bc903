"""The ``temporal_video`` job kind: Stable Video Diffusion clips from conditioning images.

Each *item* is one clip: a conditioning image with a seed. A clip is ``segments`` segments of
``num_frames`` frames; segment 0 is conditioned on the image, every later segment on the last
frame of the one before, so a clip's segments run in order inside its shard while different
clips (seeds, images) run in parallel on different workers (``shard_size`` clips per shard,
default 1).

Outputs of a clip whose item name is ``000003-s42`` (under the shard's key prefix):

- ``000003-s42-f00000.png`` ... one PNG per frame, numbered across segments;
- ``000003-s42.mp4``: every frame of every segment, H.264 at ``fps`` (the item's key);
- ``000003-s42.gif``: a small looping preview.

Segment ``k`` draws its noise from ``segment_seed(seed, k)`` (in the runner module), so a clip resumed after a
worker died renders exactly what the lost worker would have: finished segments are read back from
the store, and the next one is conditioned on the stored last frame. The runner is
:mod:`farm.worker.kinds.temporal_video`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from farm.inputs import ImageRef
from farm.job_spec import MAX_PROMPTS, JobSpec, NegativePrompt, Prompt
from farm.kinds.base import ItemSource, JobKind, ShardRunner
from farm.spec_problems import problem

MAX_IMAGES = 64
MAX_FRAMES_PER_JOB = 100_000


class TemporalVideoSpec(JobSpec):
    """Image-to-video with an SVD model; see the module docstring for segments and outputs."""

    families: ClassVar[tuple[str, ...]] = ("svd",)

    kind: Literal["temporal_video"] = "temporal_video"
    images: list[ImageRef] = Field(min_length=1, max_length=MAX_IMAGES, description="conditioning images")
    prompts: list[Prompt] = Field(default_factory=list, max_length=MAX_PROMPTS)
    negative_prompt: NegativePrompt = ""
    num_frames: int = Field(default=14, ge=2, le=64, description="frames per segment")
    segments: int = Field(default=1, ge=1, le=32, description="segments per clip, each continuing the last")
    fps: int = Field(default=7, ge=1, le=60)
    motion_bucket_id: int = Field(default=127, ge=0, le=1023)
    noise_aug_strength: float = Field(default=0.02, ge=0.0, le=1.0)
    decode_chunk_size: int = Field(default=8, ge=1, le=64, description="frames decoded by the VAE at once")
    steps: int = Field(default=25, ge=1, le=150)
    guidance: float = Field(default=3.0, ge=0.0, le=30.0, description="max guidance (last frame)")
    min_guidance: float = Field(default=1.0, ge=0.0, le=30.0, description="guidance of the first frame")
    width: int = Field(default=1024, ge=64, le=2048)
    height: int = Field(default=576, ge=64, le=2048)
    shard_size: int = Field(default=1, ge=1, le=64, description="clips per shard")

    @field_validator("prompts")
    @classmethod
    def _no_prompts(cls, value: list[str]) -> list[str]:
        if value:
            raise problem((), "temporal_video jobs are conditioned on images, not prompts; remove 'prompts'", value)
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _no_negative_prompt(cls, value: str) -> str:
        if value:
            raise problem((), "temporal_video jobs take no prompts; remove 'negative_prompt'", value)
        return value

    @field_validator("scheduler")
    @classmethod
    def _euler_only(cls, value: str) -> str:
        if value != "euler":
            raise problem((), "SVD samples with its own Euler (EDM) scheduler; use 'euler'", value)
        return value

    @model_validator(mode="after")
    def _guidance_order_and_frames(self) -> TemporalVideoSpec:
        if self.min_guidance > self.guidance:
            raise problem(("min_guidance",), f"must not exceed guidance ({self.guidance})", self.min_guidance)
        frames = self.item_count() * self.segments * self.num_frames
        if frames > MAX_FRAMES_PER_JOB:
            raise problem((), f"{frames} frames in all; a job may have at most {MAX_FRAMES_PER_JOB}", frames)
        return self

    def item_axes(self) -> dict[str, int]:
        return {"images": len(self.images), "seeds": super().item_axes()["seeds"]}

    @property
    def frames_per_clip(self) -> int:
        return self.num_frames * self.segments


def clip_items(spec: TemporalVideoSpec) -> Iterator[ItemSource]:
    """Every image with every seed, image-major; ``image_index`` rides in the item's extra axes."""
    seeds = spec.resolved_seeds()
    for image_index in range(len(spec.images)):
        for seed in seeds:
            yield ItemSource(0, seed, (("image_index", image_index),))


def runner() -> ShardRunner:
    from farm.worker.kinds.temporal_video import run_temporal_video_shard  # worker side

    return run_temporal_video_shard


KIND = JobKind(spec=TemporalVideoSpec, items=clip_items, runner=runner, ext="mp4")
