"""Sharding and routing: a pure function from a spec to its shards.

Items are ordered prompt-major (prompt 0 with every seed, then prompt 1, ...), numbered 0..N-1,
and cut into consecutive slices of at most ``shard_size``. The same spec and job id always give
the same shards, seeds and output keys. Each family has its own queue.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from farm.specs import TextToImageSpec
from storage.objects.keys import artifact_key

QUEUES = {"sd15": "farm.gpu.sd15", "sdxl": "farm.gpu.sdxl", "svd": "farm.gpu.svd"}


def queue_for(family: str) -> str:
    return QUEUES[family]


def route(spec: TextToImageSpec) -> tuple[str, int]:
    """(queue, priority) for a spec's shards."""
    return queue_for(spec.family), spec.priority


@dataclass(frozen=True)
class RenderItem:
    index: int
    prompt_index: int
    seed: int
    key: str


@dataclass(frozen=True)
class ShardPlan:
    index: int
    queue: str
    priority: int
    items: tuple[RenderItem, ...]

    def to_params(self) -> dict[str, Any]:
        return {
            "items": [
                {"index": i.index, "prompt_index": i.prompt_index, "seed": i.seed, "key": i.key} for i in self.items
            ]
        }


def item_name(index: int, seed: int) -> str:
    return f"{index:06d}-s{seed}"


def plan_shards(spec: TextToImageSpec, job_id: uuid.UUID) -> list[ShardPlan]:
    queue, priority = route(spec)
    seeds = spec.resolved_seeds()
    pairs = [(p, s) for p in range(len(spec.prompts)) for s in seeds]
    plans = []
    for shard_index, start in enumerate(range(0, len(pairs), spec.shard_size)):
        items = tuple(
            RenderItem(
                index=start + offset,
                prompt_index=p,
                seed=s,
                key=artifact_key(spec.output_prefix, job_id, shard_index, item_name(start + offset, s), "png"),
            )
            for offset, (p, s) in enumerate(pairs[start : start + spec.shard_size])
        )
        plans.append(ShardPlan(shard_index, queue, priority, items))
    return plans
