"""Model families: the architectures a job runs on, each with its own GPU worker queue; and the
CPU queue, where kinds that load no model (the post-steps: ``encode``, ``upscale``, ...) run."""

from __future__ import annotations

from typing import Literal, get_args

Family = Literal["sd15", "sdxl", "svd"]
FAMILIES: tuple[str, ...] = get_args(Family)

CPU_FAMILY = "cpu"  # what a job of a kind without a model records as its family
CPU_QUEUE = "farm.cpu"  # its shards' queue: `farm worker --queues farm.cpu` pins no model
