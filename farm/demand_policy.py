"""How many workers a work queue (a GPU queue or ``farm.cpu``) wants: the autoscaling policy as a pure function.

:func:`desired_workers` reads one :class:`QueueLoad` (what :mod:`farm.demand` read from the
database) and a :class:`ScalePolicy` (from the ``autoscale`` settings) and returns a worker
count:

- enough workers to render the items left (``items_left x seconds_per_item``) within the queue's
  ``target_drain_s``, counting one model load (``model_load_s``) for each worker beyond those
  already live; never more than the shards open (a worker renders one shard at a time);
- never fewer than the shards running, and at least one while any shard is open;
- zero when nothing waits or runs;
- **hold-down**: within ``hold_down_s`` of the queue's last activity (a shard started or ended)
  the count never drops below the workers live now, so a worker that just loaded its model is
  not removed at once (and a busy queue only shrinks once it has been quiet that long);
- at most ``max_workers`` when the queue has a cap (the cap wins over every floor).

No database, no clock: ``tests/test_demand.py`` checks its properties with hypothesis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

_EPSILON = 1e-9  # float noise must not add a worker: ceil(3.0000000001) is 4


@dataclass(frozen=True)
class ScalePolicy:
    """One queue's autoscaling settings (see :class:`farm.settings.AutoscaleSettings`)."""

    target_drain_s: float
    hold_down_s: float
    max_workers: int | None = None


@dataclass(frozen=True)
class QueueLoad:
    """What waits and runs on one work queue, and how fast it has been going."""

    queue: str
    family: str
    pending: int = 0  # in the database, not yet sent to the broker
    queued: int = 0  # sent to the broker, not yet claimed
    running: int = 0  # claimed under a lease
    items_left: int = 0  # items not yet done of those shards
    oldest_waiting_s: float = 0.0  # age of the oldest pending or queued shard (0: none waits)
    seconds_per_item: float = 1.0  # observed on recent shards, else the settings' default
    model_load_s: float = 0.0  # observed on recent model loads, else the settings' default
    observed: bool = False  # whether the two figures above were measured (not defaults)
    live_workers: int = 0  # workers online that consume the queue
    idle_for_s: float | None = None  # since the last shard started or ended here (None: long ago)

    @property
    def waiting(self) -> int:
        return self.pending + self.queued

    @property
    def open_shards(self) -> int:
        return self.pending + self.queued + self.running


def workers_to_drain(work_s: float, live: int, target_s: float, load_s: float) -> int | None:
    """The fewest workers (at least 1) that render ``work_s`` seconds of items within ``target_s``
    when each worker beyond the ``live`` ones first spends ``load_s`` loading its model; ``None``
    when no number does (a load alone takes the whole target)."""
    if work_s <= live * target_s:
        return max(1, math.ceil(work_s / target_s - _EPSILON))
    per_new = target_s - load_s
    if per_new <= 0:
        return None
    return live + math.ceil((work_s - live * target_s) / per_new - _EPSILON)


def desired_workers(load: QueueLoad, policy: ScalePolicy) -> int:
    """The worker count the queue wants now (see the module docstring)."""
    wanted = 0
    if load.open_shards > 0:
        work_s = load.items_left * load.seconds_per_item
        enough = workers_to_drain(work_s, load.live_workers, policy.target_drain_s, load.model_load_s)
        wanted = load.open_shards if enough is None else min(enough, load.open_shards)
        wanted = max(wanted, load.running, 1)
    held = load.idle_for_s is not None and load.idle_for_s < policy.hold_down_s
    if held and wanted < load.live_workers:
        wanted = load.live_workers
    if policy.max_workers is not None:
        wanted = min(wanted, policy.max_workers)
    return wanted


@dataclass(frozen=True)
class QueueDemand:
    """A queue's load with the worker count it wants: a row of ``farm status --queues``, of
    ``GET /v1/queues`` and of the ``farm_queue_*`` metrics."""

    load: QueueLoad
    desired_workers: int
    target_drain_s: float
    max_workers: int | None

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self.load)
        row.update(
            oldest_waiting_s=round(self.load.oldest_waiting_s, 1),
            seconds_per_item=round(self.load.seconds_per_item, 4),
            model_load_s=round(self.load.model_load_s, 3),
            idle_for_s=None if self.load.idle_for_s is None else round(self.load.idle_for_s, 1),
            desired_workers=self.desired_workers,
            target_drain_s=self.target_drain_s,
            max_workers=self.max_workers,
        )
        return row


def demand_of(load: QueueLoad, policy: ScalePolicy) -> QueueDemand:
    return QueueDemand(load, desired_workers(load, policy), policy.target_drain_s, policy.max_workers)
