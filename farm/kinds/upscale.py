"""The ``upscale`` step: every image of the source job (stills and video frames) enlarged by
``scale`` with a Lanczos filter on the CPU, as PNG beside the source's outputs.

``parts`` splits the work into that many shards (part ``p`` takes the source's images at
positions ``p, p + parts, ...`` in key order), so several CPU workers share it. An output larger
than ``max_pixels`` (width x height) is refused. The runner is :mod:`farm.worker.kinds.upscale`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from farm.kinds.base import ShardRunner
from farm.kinds.step import StepSpec, step_kind

MAX_PIXELS = 4096 * 4096  # the largest upscaled image, width x height
MAX_PARTS = 64


class UpscaleSpec(StepSpec):
    """Images of ``source_job`` enlarged ``scale`` times (Lanczos)."""

    kind: Literal["upscale"] = "upscale"
    scale: int = Field(default=2, ge=2, le=4, description="enlargement factor of width and height")
    parts: int = Field(default=1, ge=1, le=MAX_PARTS, description="shards the images are split into")
    max_pixels: int = Field(
        default=MAX_PIXELS, ge=1, le=MAX_PIXELS, description="largest output (width x height) accepted"
    )

    def part_count(self) -> int:
        return self.parts


def runner() -> ShardRunner:
    from farm.worker.kinds.upscale import run_upscale_shard  # worker side

    return run_upscale_shard


KIND = step_kind(UpscaleSpec, runner)
