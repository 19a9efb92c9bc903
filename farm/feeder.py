"""Windowed feeding of bulk jobs: at most ``bulk.window_per_queue`` bulk shards queued or running
per GPU queue, topped up as shards end.

:func:`feed_bulk` runs after every bulk shard ends (the finalize task), after a bulk submit, and
every ``bulk.feed_interval_s`` from ``farm beat``. It locks the bulk jobs' rows so concurrent
feeders take turns, counts each queue's shards in flight (QUEUED or RUNNING: on the broker or
with a worker), and returns the PENDING shards that fit, oldest bulk job first. The caller
publishes them, then marks them queued (:func:`~storage.transitions.mark_shards_queued`): a
crash in between leaves them PENDING, to be sent again (a duplicate message is harmless: the
lease turns it away). A bulk job past its ``feed_until`` gets nothing more; it stays resumable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from farm.dispatch import publish_shards, shard_labels
from farm.scheduler import ShardDispatch
from farm.sharding import QUEUES
from storage.db import session_scope
from storage.models import BulkJob, Job, Shard, utcnow
from storage.status import JobStatus, ShardStatus
from storage.transitions import mark_shards_queued

IN_FLIGHT = (ShardStatus.QUEUED, ShardStatus.RUNNING)


def in_flight(session: Session) -> dict[str, int]:
    """Bulk shards queued or running, per queue."""
    rows = session.execute(
        select(Shard.queue, func.count())
        .join(Job, Job.id == Shard.job_id)
        .where(Job.bulk_id.is_not(None), Shard.status.in_(IN_FLIGHT))
        .group_by(Shard.queue)
    )
    return {queue: int(n) for queue, n in rows}


def feed_bulk(session: Session, window: int, now: datetime | None = None) -> list[ShardDispatch]:
    """The PENDING bulk shards to send now so that no queue has more than ``window`` in flight.
    Each pick reads one job's pending shards through its ``(job_id, status)`` index: the cost of
    a call does not grow with the rows already fed or still waiting."""
    now = now or utcnow()
    bulks = session.execute(select(BulkJob.id, BulkJob.feed_until).order_by(BulkJob.id).with_for_update()).all()
    if not any(b.feed_until is None or b.feed_until > now for b in bulks):
        return []
    feeding = select(BulkJob.id).where(or_(BulkJob.feed_until.is_(None), BulkJob.feed_until > now))
    jobs = session.execute(  # a subquery, not a list of ids: no bound on how many bulk jobs there are
        select(Job.id, Job.priority)
        .where(Job.bulk_id.in_(feeding), Job.status == JobStatus.RUNNING)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
    ).all()
    busy = in_flight(session)
    dispatches: list[ShardDispatch] = []
    for queue in QUEUES.values():
        free = window - busy.get(queue, 0)
        for job in jobs:
            if free <= 0:
                break
            picked = session.scalars(
                select(Shard.id)
                .where(Shard.job_id == job.id, Shard.status == ShardStatus.PENDING, Shard.queue == queue)
                .order_by(Shard.index)
                .limit(free)
            ).all()
            dispatches.extend(ShardDispatch(shard_id, job.id, queue, job.priority) for shard_id in picked)
            free -= len(picked)
    return dispatches


def feed(app: Any, session_factory: Any, window: int, now: datetime | None = None) -> int:
    """Top every queue's window up: publish the shards :func:`feed_bulk` picks, then mark them
    queued, under the feeder's lock. Returns how many were sent."""

    with session_scope(session_factory) as session:
        dispatches = feed_bulk(session, window, now)
        sent = publish_shards(app, dispatches, labels=shard_labels(session, [d.shard_id for d in dispatches]))
        mark_shards_queued(session, sent)
    return len(sent)


def top_up(app: Any, res: Any) -> int:
    """:func:`feed` with a worker's resources (``res``: settings, session factory, ``outlast``),
    waiting out service outages. Returns how many shards were sent."""
    window = res.settings.bulk.window_per_queue
    return res.outlast(lambda: feed(app, res.session_factory, window), "bulk feed")


def feed_windows(app: Any, res: Any) -> dict[str, int]:
    """What ``farm.feed_bulk`` does (``farm beat`` sends it every ``bulk.feed_interval_s``): top
    the bulk windows up. Returns the task's result."""
    return {"fed": top_up(app, res)}
