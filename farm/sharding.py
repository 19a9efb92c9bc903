"""Sharding and routing: pure functions from a validated spec to its shards and queue.

A job's *render items* are enumerated by its kind's items generator (:attr:`JobKind.items
<farm.kinds.base.JobKind.items>`) in a fixed order and numbered ``0..N-1``; consecutive runs of at
most ``spec.shard_size`` items form the shards ``0..n-1``.

Each item's output key is ``{output_prefix}/{job_id}/{shard_index:05d}/{item}.{ext}`` with the
item name ``{index:06d}-s{seed}`` (e.g. ``renders/<job>/00003/000012-s1234.png``). Nothing here
reads a clock, a random source or the database: the same spec and job id always give the same
shards, seeds and keys.

A kind whose items span more axes (reference frames, conditioning images) puts them in
:attr:`RenderItem.extra`; they are flattened into the shard params.

A spec with ``only_items`` (a re-run of a job's failed items) keeps just those items of the full
enumeration, each with the index and seed it has in the full job; they form the shards as above.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from farm.families import CPU_QUEUE, FAMILIES, gpu_queue
from farm.job_spec import JobSpec
from farm.kinds import item_name, job_kind
from storage.objects.keys import artifact_key

QUEUES: dict[str, str] = {family: gpu_queue(family) for family in FAMILIES}
# Every queue shards are sent to: a GPU queue per family, and the CPU queue of the jobs that load
# no model (:meth:`JobKind.queue_for <farm.kinds.base.JobKind.queue_for>`). The feeder tops each
# one's window up.
WORK_QUEUES: tuple[str, ...] = (*QUEUES.values(), CPU_QUEUE)


def route(spec: JobSpec) -> tuple[str, int]:
    """``(queue, priority)`` for every shard of ``spec``: the GPU queue of its family when it loads
    a model, else ``farm.cpu`` (:meth:`JobKind.queue_for <farm.kinds.base.JobKind.queue_for>`)."""
    return job_kind(spec.kind).queue_for(spec), spec.priority


@dataclass(frozen=True)
class RenderItem:
    """One output to render: global ``index`` (0-based, in job order), which prompt, which
    seed, and the object key its output is written to."""

    index: int
    prompt_index: int
    seed: int
    key: str
    extra: tuple[tuple[str, int | str], ...] = ()

    def to_params(self) -> dict[str, Any]:
        """The item as JSON-able data; ``extra`` axes are flattened in (the core names win)."""
        core = {"index": self.index, "prompt_index": self.prompt_index, "seed": self.seed, "key": self.key}
        return {**dict(self.extra), **core}


@dataclass(frozen=True)
class ShardPlan:
    """One shard to insert and enqueue: its index in the job, its queue and priority, its items."""

    index: int
    queue: str
    priority: int
    items: tuple[RenderItem, ...]

    def to_params(self) -> dict[str, Any]:
        """JSON-able parameters stored on the shard row: ``{"items": [{index, prompt_index,
        seed, key, ...extra}, ...]}``."""
        return {"items": [item.to_params() for item in self.items]}


def iter_shards(spec: JobSpec, job_id: object) -> Iterator[ShardPlan]:
    """The shards of ``spec`` one at a time (for feeding very large jobs in windows)."""
    kind = job_kind(spec.kind)
    queue, priority = route(spec)
    sources: Iterator[tuple[int, Any]] = enumerate(kind.items(spec))
    if spec.only_items is not None:
        wanted = frozenset(spec.only_items)
        sources = itertools.islice(((index, src) for index, src in sources if index in wanted), len(spec.only_items))
    for shard_index in itertools.count():
        batch = list(itertools.islice(sources, spec.shard_size))
        if not batch:
            return
        items = tuple(
            RenderItem(
                index=index,
                prompt_index=src.prompt_index,
                seed=src.seed,
                key=artifact_key(spec.output_prefix, job_id, shard_index, item_name(index, src.seed), kind.ext),
                extra=src.extra,
            )
            for index, src in batch
        )
        yield ShardPlan(shard_index, queue, priority, items)


def plan_shards(spec: JobSpec, job_id: object) -> list[ShardPlan]:
    """Every shard of ``spec`` for job ``job_id`` (a UUID or a valid key part), in order."""
    return list(iter_shards(spec, job_id))


def shard_count(spec: JobSpec) -> int:
    """How many shards :func:`plan_shards` returns, without building them."""
    return -(-spec.item_count() // spec.shard_size)
