"""The ``encode`` step: the source job's frames as H.264 mp4s, one per video.

A ``temporal_video`` source gives one mp4 per clip (its frame PNGs in frame order); a source of
stills (``text_to_image``, ...) gives one mp4 of all its stills in item order. Frames are streamed
into the ffmpeg that imageio-ffmpeg ships (yuv420p, odd sizes padded to even). The runner is
:mod:`farm.worker.kinds.encode`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from farm.kinds.base import ShardRunner
from farm.kinds.step import StepSpec, step_kind


class EncodeSpec(StepSpec):
    """Frames of ``source_job`` -> H.264 mp4 at ``fps`` and ``crf``."""

    kind: Literal["encode"] = "encode"
    fps: int = Field(default=8, ge=1, le=60, description="frames per second of the mp4")
    crf: int = Field(default=18, ge=0, le=51, description="H.264 quality: 0 lossless .. 51 worst (18: visually clean)")


def runner() -> ShardRunner:
    from farm.worker.kinds.encode import run_encode_shard  # worker side

    return run_encode_shard


KIND = step_kind(EncodeSpec, runner)
