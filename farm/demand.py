"""Demand per work queue (each GPU queue and ``farm.cpu``), read from the database: what waits,
what runs, how fast it goes, and the worker count each queue wants (:func:`farm.demand_policy.desired_workers`).

The broker cannot say this: a Redis ``LLEN`` of a queue's key misses the messages of its other
priority sub-lists, the messages workers hold (prefetched or running) and every shard the feeder
keeps PENDING in the database. The shard table knows them all, so an autoscaler follows these
figures (``farm_queue_*`` on ``farm api``'s ``/metrics``, ``farm status --queues``,
``GET /v1/queues``):

- shards pending (only those the feeder may send: their job runs, a bulk run's feeding window
  is open, :func:`farm.feeder.feedable_job`, and their dependencies release them,
  :func:`storage.dependencies.released`), queued and running, and their items left;
- the age of the oldest pending or queued shard (since it was made);
- seconds per item and per model load, measured on the last ``SAMPLE`` shards of the queue that
  ended within ``autoscale.observe_s`` (the attempt's time less its model load, over its items;
  a model load is a shard's ``load_s`` when its ``model_loaded`` timing says the worker loaded
  the model for it); the settings' defaults before any is measured;
- live workers (:func:`storage.registry.queue_consumers`) and how long ago a shard last started
  or ended on the queue (the hold-down).

Three queries: the open shards grouped by queue and status, the recent ends (through the jobs
that run or ended within the window), the live workers. The caller owns the session.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from farm.demand_policy import QueueDemand, QueueLoad, ScalePolicy, demand_of
from farm.families import CPU_FAMILY, CPU_QUEUE
from farm.feeder import feedable_job
from farm.settings import AutoscaleSettings, FarmSettings
from farm.sharding import QUEUES
from storage.dependencies import released
from storage.models import Job, Shard, utcnow
from storage.registry import queue_consumers
from storage.status import SHARD_TERMINAL, JobStatus, ShardStatus

SAMPLE = 100  # recent shards per queue that the speeds are measured on
OPEN = (ShardStatus.PENDING, ShardStatus.QUEUED, ShardStatus.RUNNING)


def policy_for(conf: AutoscaleSettings, queue: str) -> ScalePolicy:
    """The queue's autoscaling policy from the ``autoscale`` settings."""
    return ScalePolicy(conf.target_for(queue), conf.hold_down_s, conf.max_workers.get(queue))


def queue_demands(session: Session, settings: FarmSettings, now: datetime | None = None) -> list[QueueDemand]:
    """Every work queue's load and desired workers, in the order of the families (idle queues
    included, with zeros)."""
    return [demand_of(load, policy_for(settings.autoscale, load.queue)) for load in read_loads(session, settings, now)]


def read_loads(session: Session, settings: FarmSettings, now: datetime | None = None) -> list[QueueLoad]:
    now = now or utcnow()
    conf = settings.autoscale
    shards = _open_shards(session, now)
    speeds = _recent_ends(session, now - timedelta(seconds=max(conf.observe_s, conf.hold_down_s)), now, conf)
    consumers = queue_consumers(session, settings.worker.lost_after_s, now)
    loads = []
    for family, queue in (*QUEUES.items(), (CPU_FAMILY, CPU_QUEUE)):
        counts = shards.get(queue, {})
        seen = speeds.get(queue, {})
        waiting_since = min((c["oldest"] for s, c in counts.items() if s != ShardStatus.RUNNING), default=None)
        active = [t for t in (seen.get("last_end"), counts.get(ShardStatus.RUNNING, {}).get("last_start")) if t]
        loads.append(
            QueueLoad(
                queue=queue,
                family=family,
                pending=counts.get(ShardStatus.PENDING, {}).get("shards", 0),
                queued=counts.get(ShardStatus.QUEUED, {}).get("shards", 0),
                running=counts.get(ShardStatus.RUNNING, {}).get("shards", 0),
                items_left=sum(c["items_left"] for c in counts.values()),
                oldest_waiting_s=_seconds(now, waiting_since) if waiting_since else 0.0,
                seconds_per_item=seen.get("seconds_per_item", conf.default_seconds_per_item),
                model_load_s=seen.get("model_load_s", conf.default_load_s),
                observed="seconds_per_item" in seen,
                live_workers=len(consumers.get(queue, [])),
                idle_for_s=_seconds(now, max(active)) if active else None,
            )
        )
    return loads


def _seconds(now: datetime, then: datetime) -> float:
    return max(0.0, (now - then).total_seconds())


def _open_shards(session: Session, now: datetime) -> dict[str, dict[ShardStatus, dict[str, Any]]]:
    """Per queue and status: shards, items left, the oldest one's creation, the last claim."""
    rows = session.execute(
        select(
            Shard.queue,
            Shard.status,
            func.count(),
            func.sum(Shard.items_total - Shard.items_done),
            func.min(Shard.created_at),
            func.max(Shard.started_at),
        )
        .join(Job, Job.id == Shard.job_id)
        .where(
            Shard.status.in_(OPEN),
            or_(Shard.status != ShardStatus.PENDING, and_(feedable_job(now), released(Shard.job_id, Shard.index))),
        )
        .group_by(Shard.queue, Shard.status)
    )
    found: dict[str, dict[ShardStatus, dict[str, Any]]] = {}
    for queue, status, shards, items_left, oldest, last_start in rows:
        found.setdefault(queue, {})[ShardStatus(status)] = {
            "shards": int(shards),
            "items_left": max(0, int(items_left or 0)),
            "oldest": oldest,
            "last_start": last_start,
        }
    return found


def _recent_ends(
    session: Session, since: datetime, now: datetime, conf: AutoscaleSettings
) -> dict[str, dict[str, Any]]:
    """Per queue, from its last ``SAMPLE`` shards that ended since ``since``: when the last one
    ended, and (from those within ``observe_s``) seconds per item and per model load."""
    recent_jobs = select(Job.id).where(or_(Job.status == JobStatus.RUNNING, Job.finished_at >= since))
    ranked = (
        select(
            Shard.queue,
            Shard.status,
            Shard.started_at,
            Shard.finished_at,
            Shard.items_done,
            Shard.timings,
            func.row_number().over(partition_by=Shard.queue, order_by=Shard.finished_at.desc()).label("recent"),
        )
        .where(Shard.job_id.in_(recent_jobs), Shard.status.in_(SHARD_TERMINAL), Shard.finished_at >= since)
        .subquery()
    )
    observe_since = now - timedelta(seconds=conf.observe_s)
    found: dict[str, dict[str, Any]] = {}
    sums: dict[str, list[float]] = {}  # queue -> [render seconds, items, load seconds, loads]
    for row in session.execute(select(ranked).where(ranked.c.recent <= SAMPLE)):
        seen = found.setdefault(row.queue, {})
        seen["last_end"] = max(seen.get("last_end") or row.finished_at, row.finished_at)
        if row.finished_at < observe_since or row.started_at is None:
            continue
        timings = row.timings or {}
        load_s = float(timings.get("load_s") or 0.0)
        total = sums.setdefault(row.queue, [0.0, 0.0, 0.0, 0.0])
        if ShardStatus(row.status) == ShardStatus.SUCCEEDED and row.items_done > 0:
            total[0] += max(0.0, _seconds(row.finished_at, row.started_at) - load_s)
            total[1] += row.items_done
        if timings.get("model_loaded"):
            total[2] += load_s
            total[3] += 1
    for queue, (render_s, items, load_s, loads) in sums.items():
        if items:
            found[queue]["seconds_per_item"] = render_s / items
        if loads:
            found[queue]["model_load_s"] = load_s / loads
    return found


# -- Prometheus text (``farm api``'s /metrics) ------------------------------------------------
METRICS: tuple[tuple[str, str], ...] = (
    ("farm_queue_desired_workers", "Workers the queue wants now (autoscale settings; 0 when idle past hold-down)."),
    ("farm_queue_shards", "Shards of the queue by status: pending (in the database), queued (on the broker), running."),
    ("farm_queue_items_left", "Items not yet done of the queue's open shards."),
    ("farm_queue_oldest_waiting_seconds", "Age of the oldest pending or queued shard; 0 when none waits."),
    ("farm_queue_seconds_per_item", "Seconds per item measured on recent shards (the default before any)."),
    ("farm_queue_model_load_seconds", "Seconds per model load measured on recent shards (the default before any)."),
    ("farm_queue_live_workers", "Workers online that consume the queue."),
)


def metric_lines(demands: list[QueueDemand]) -> list[str]:
    """The ``farm_queue_*`` gauges in Prometheus text format, every queue of ``demands``."""
    values: dict[str, list[str]] = {name: [] for name, _ in METRICS}
    for d in demands:
        load, q = d.load, f'queue="{d.load.queue}"'
        values["farm_queue_desired_workers"].append(f"{{{q}}} {d.desired_workers}")
        for status, n in (("pending", load.pending), ("queued", load.queued), ("running", load.running)):
            values["farm_queue_shards"].append(f'{{{q},status="{status}"}} {n}')
        values["farm_queue_items_left"].append(f"{{{q}}} {load.items_left}")
        values["farm_queue_oldest_waiting_seconds"].append(f"{{{q}}} {load.oldest_waiting_s:.3f}")
        values["farm_queue_seconds_per_item"].append(f"{{{q}}} {load.seconds_per_item:.6g}")
        values["farm_queue_model_load_seconds"].append(f"{{{q}}} {load.model_load_s:.6g}")
        values["farm_queue_live_workers"].append(f"{{{q}}} {load.live_workers}")
    lines = []
    for name, help_text in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [name + sample for sample in values[name]]
    return lines
