"""Model families: the architectures a job runs on, each with its own GPU worker queue; and the
CPU queue, where jobs that load no model (the post-steps: ``encode``, a Lanczos ``upscale``, ...) run."""

from __future__ import annotations

from typing import Literal, get_args

from farm.errors import UserError

Family = Literal["sd15", "sdxl", "svd"]
FAMILIES: tuple[str, ...] = get_args(Family)

CPU_FAMILY = "cpu"  # what a job that loads no model records as its family
CPU_QUEUE = "farm.cpu"  # its shards' queue: `farm worker --queues farm.cpu` pins no model

GPU_QUEUE_PREFIX = "farm.gpu."


def gpu_queue(family: str) -> str:
    """The GPU worker queue of a model family: ``farm.gpu.{family}``."""
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return f"{GPU_QUEUE_PREFIX}{family}"
