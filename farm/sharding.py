"""Sharding and routing: pure functions from a validated spec to its shards and queue.

A job's *render items* are enumerated by its kind's items generator in a fixed order and
numbered ``0..N-1``; consecutive runs of at most ``spec.shard_size`` items form the shards
``0..n-1``. For ``text_to_image`` the order is **prompt-major**: prompt 0 with every seed (in
``resolved_seeds()`` order), then prompt 1, ... so a shard mostly renders one prompt and a
prompt's images sit together in the outputs.

Each item's output key is ``{output_prefix}/{job_id}/{shard_index:05d}/{item}.{ext}`` with the
item name ``{index:06d}-s{seed}`` (e.g. ``renders/<job>/00003/000012-s1234.png``). Nothing here
reads a clock, a random source or the database: the same spec and job id always give the same
shards, seeds and keys.

A later kind adds its items generator with :func:`register_items` (it may span more axes, e.g.
reference frames: those go in :attr:`RenderItem.extra` and the shard params).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from farm.errors import FarmError, UserError
from farm.specs import FAMILIES, JobSpec, load_extensions
from storage.objects.keys import artifact_key

QUEUE_PREFIX = "farm.gpu."
QUEUES: dict[str, str] = {family: f"{QUEUE_PREFIX}{family}" for family in FAMILIES}


def queue_for(family: str) -> str:
    """The GPU worker queue for a model family: ``farm.gpu.{family}``."""
    try:
        return QUEUES[family]
    except KeyError:
        raise UserError(f"unknown model family {family!r}; known: {', '.join(QUEUES)}") from None


def route(spec: JobSpec) -> tuple[str, int]:
    """``(queue, priority)`` for every shard of ``spec``."""
    return queue_for(spec.family), spec.priority


@dataclass(frozen=True)
class ItemSource:
    """One render item as an items generator yields it, before it gets an index and a key.
    ``extra`` holds further axes of later kinds as ``(name, value)`` pairs."""

    prompt_index: int
    seed: int
    extra: tuple[tuple[str, int | str], ...] = ()


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


ItemsGenerator = Callable[[Any], Iterable[ItemSource]]


@dataclass(frozen=True)
class KindItems:
    """How a job kind enumerates its items and which file extension its outputs have."""

    generate: ItemsGenerator
    ext: str


ITEMS_BY_KIND: dict[str, KindItems] = {}


def register_items(kind: str, *, ext: str = "png") -> Callable[[ItemsGenerator], ItemsGenerator]:
    """Decorator: ``generate(spec)`` enumerates the render items of ``kind`` jobs, in order."""

    def decorate(generate: ItemsGenerator) -> ItemsGenerator:
        ITEMS_BY_KIND[kind] = KindItems(generate, ext)
        return generate

    return decorate


@register_items("text_to_image", ext="png")
def prompt_major_items(spec: JobSpec) -> Iterator[ItemSource]:
    """Every prompt with every seed, prompt-major."""
    seeds = spec.resolved_seeds()
    for prompt_index in range(len(spec.prompts)):
        for seed in seeds:
            yield ItemSource(prompt_index, seed)


def item_name(index: int, seed: int) -> str:
    """The readable, unique-per-job file stem of an item: ``000012-s1234``."""
    return f"{index:06d}-s{seed}"


def _kind_items(spec: JobSpec) -> KindItems:
    load_extensions()
    try:
        return ITEMS_BY_KIND[spec.kind]
    except KeyError:
        raise FarmError(f"job kind {spec.kind!r} has no items generator (farm.sharding.register_items)") from None


def iter_shards(spec: JobSpec, job_id: object) -> Iterator[ShardPlan]:
    """The shards of ``spec`` one at a time (for feeding very large jobs in windows)."""
    kind = _kind_items(spec)
    queue, priority = route(spec)
    sources = enumerate(kind.generate(spec))
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
