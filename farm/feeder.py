"""The window feeder: the database decides what runs next, the broker holds a small window.

Every job's shards stay PENDING in the database until the feeder sends them. Per queue (each GPU
queue, and ``farm.cpu`` for the kinds that run no model), at
most one shard per live worker of the queue plus ``scheduling.window_per_queue`` are in flight
(queued on the broker or running); the next ones are chosen by the policy in
:mod:`farm.fair_share` (interactive before bulk, weighted fair share between projects, then
between users, then job priority and age) within the running caps of projects and users.

:func:`feed` runs after a job is split into shards, after every shard's attempt ends (in the
worker, together with the shard's charge to the fair-share ledger), after a retry or a bulk
submit, every ``scheduling.feed_interval_s`` from ``farm beat``, and in every reconciler pass.
Each queue is fed in a transaction that holds the queue's lock (:func:`storage.share_usage.
lock_queue`): the shards are picked, published, then marked queued; a crash in between leaves
them PENDING, to be sent again (a duplicate message is harmless: the lease turns it away).

**Dependencies.** A job's PENDING shards whose upstream work is not done (``after:``) are not
picked: :func:`waiting_jobs` and the shard source carry the release conditions of
:mod:`storage.dependencies`, so a shard is released by the first feed after its upstream
succeeded, under the queue's lock, exactly once.

**Preemption.** When interactive shards wait on a queue (queued, unclaimed) beyond its idle
workers (live workers of the queue less its running shards) while its workers render bulk
shards, the feeder asks that many bulk shards to stop (``shard.preempt_requested_at``; queues in
``scheduling.preempt_queues``). A worker learns it from its lease keeper and hands the shard
back between items: items done are kept, no attempt is counted, the shard goes back to PENDING
to be fed again, and the worker takes the interactive shard, sent with the broker priority that
puts it ahead of queued bulk shards.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from farm.dispatch import class_priority, publish_shards, shard_labels
from farm.fair_share import DEFAULT_SECONDS_PER_ITEM, Charge, ShareState, WaitingJob, WaitingShard, pick_shards
from farm.scheduler import ShardDispatch, create_shards
from farm.settings import FarmSettings
from farm.sharding import WORK_QUEUES
from storage.db import session_scope
from storage.dependencies import may_feed, shard_released
from storage.models import BulkJob, Job, Project, Shard, User, utcnow
from storage.registry import queue_consumers
from storage.share_usage import charge_usage, lock_queue, read_usage
from storage.status import JobStatus, ServiceClass, ShardStatus
from storage.transitions import mark_shards_queued

IN_FLIGHT = (ShardStatus.QUEUED, ShardStatus.RUNNING)


@dataclass
class FeedDecision:
    """What one feed of a queue decided: the shards to send (with their class), and how many
    bulk shards were asked to hand back."""

    queue: str
    dispatches: list[tuple[ShardDispatch, ServiceClass]] = field(default_factory=list)
    preempted: int = 0


@dataclass
class _InFlight:
    """Shards queued or running: per project and user (every queue, for the caps), their items
    per (project, user) (for the usage estimate), and on the fed queue per class and status."""

    project: dict[uuid.UUID, int] = field(default_factory=lambda: defaultdict(int))
    user: dict[uuid.UUID, int] = field(default_factory=lambda: defaultdict(int))
    pair_items: dict[tuple[uuid.UUID, uuid.UUID], int] = field(default_factory=lambda: defaultdict(int))
    here: dict[tuple[ServiceClass, ShardStatus], int] = field(default_factory=lambda: defaultdict(int))

    def on_queue(self, *classes: ServiceClass) -> int:
        return sum(n for (c, _), n in self.here.items() if c in classes)


def in_flight(session: Session, queue: str) -> _InFlight:
    counts = _InFlight()
    items = func.sum(case((Shard.items_total > 1, Shard.items_total), else_=1))  # as ShareState.charge counts them
    rows = session.execute(
        select(Shard.queue, Shard.status, Job.project_id, Job.owner_id, Job.service_class, items, func.count())
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.status.in_(IN_FLIGHT))
        .group_by(Shard.queue, Shard.status, Job.project_id, Job.owner_id, Job.service_class)
    )
    for row in rows:
        n = int(row[-1])
        counts.project[row.project_id] += n
        counts.user[row.owner_id] += n
        counts.pair_items[(row.project_id, row.owner_id)] += int(row[-2])
        if row.queue == queue:
            counts.here[(ServiceClass(row.service_class), ShardStatus(row.status))] += n
    return counts


def feedable_job(now: datetime) -> ColumnElement[bool]:
    """Whether a job's PENDING shards may be fed now: the job runs and, for a bulk run's job, the
    run's feeding window is open (the demand figures of :mod:`farm.demand` count the same)."""
    feeding = select(BulkJob.id).where(or_(BulkJob.feed_until.is_(None), BulkJob.feed_until > now))
    return and_(Job.status == JobStatus.RUNNING, or_(Job.bulk_id.is_(None), Job.bulk_id.in_(feeding)))


def waiting_jobs(session: Session, queue: str, now: datetime) -> list[WaitingJob]:
    """Running jobs with PENDING shards on ``queue`` that their dependencies release
    (:mod:`storage.dependencies`; a bulk run's only while it may be fed)."""
    columns = (Job.id, Job.project_id, Job.owner_id, Job.service_class, Job.priority, Job.created_at)
    rows = session.execute(
        select(*columns).where(
            feedable_job(now),
            may_feed(Job.id, queue),
        )
    )
    return [WaitingJob(*row) for row in rows]  # the column types give ServiceClass and aware datetimes


def share_state(
    session: Session, settings: FarmSettings, counts: _InFlight, room: dict[ServiceClass, int], now: datetime
) -> ShareState:
    """The fair-share state: weights and caps (database values over the settings), the decayed
    ledger, and the shards in flight at their estimated cost."""
    conf = settings.scheduling
    usage = read_usage(session, conf.half_life_s, now)
    seconds = sum(u.gpu_seconds for u in usage.values())
    items = sum(u.items for u in usage.values())
    per_item = seconds / items if items > 0 and seconds > 0 else DEFAULT_SECONDS_PER_ITEM
    state = ShareState(room=dict(room), seconds_per_item=per_item)
    for (project_id, user_id), used in usage.items():
        state.usage_project[project_id] = state.usage_project.get(project_id, 0.0) + used.gpu_seconds
        state.usage_user[(project_id, user_id)] = used.gpu_seconds
    for (project_id, user_id), n in counts.pair_items.items():  # not in the ledger until they end: as when picked
        state.usage_project[project_id] = state.usage_project.get(project_id, 0.0) + n * per_item
        state.usage_user[(project_id, user_id)] = state.usage_user.get((project_id, user_id), 0.0) + n * per_item
    state.in_flight_project.update(counts.project)
    state.in_flight_user.update(counts.user)
    for row in session.execute(select(Project.id, Project.name, Project.share_weight, Project.max_running_shards)):
        state.weights[row.id] = conf.project_weight(row.name, row.share_weight)
        if cap := conf.project_cap(row.max_running_shards):
            state.cap_project[row.id] = cap
    user_caps = select(User.id, User.max_running_shards)
    if not conf.max_running_per_user:  # only users with a cap of their own have one
        user_caps = user_caps.where(User.max_running_shards.is_not(None))
    for row in session.execute(user_caps):  # every user: one with nothing in flight yet is capped too
        if cap := conf.user_cap(row.max_running_shards):
            state.cap_user[row.id] = cap
    return state


class _ShardSource:
    """A job's next PENDING shards on the queue that its dependencies release, read a batch at a
    time through the ``(job_id, status, index)`` index."""

    def __init__(self, session: Session, queue: str, batch: int) -> None:
        self.session, self.queue, self.batch = session, queue, max(1, batch)
        self.read: dict[uuid.UUID, list[WaitingShard]] = {}
        self.after: dict[uuid.UUID, int] = {}

    def __call__(self, job: WaitingJob) -> WaitingShard | None:
        left = self.read.get(job.job_id)
        if not left:
            rows = self.session.execute(
                select(Shard.id, Shard.index, Shard.items_total)
                .where(
                    Shard.job_id == job.job_id,
                    Shard.status == ShardStatus.PENDING,
                    Shard.queue == self.queue,
                    Shard.index > self.after.get(job.job_id, -1),
                    shard_released(Shard.job_id, Shard.index),  # job-level: waiting_jobs checked it
                )
                .order_by(Shard.index)
                .limit(self.batch)
            ).all()
            if not rows:
                return None
            self.after[job.job_id] = rows[-1].index
            left = self.read[job.job_id] = [WaitingShard(r.id, r.items_total) for r in rows]
        return left.pop(0)


def feed_queue(session: Session, settings: FarmSettings, queue: str, now: datetime | None = None) -> FeedDecision:
    """Lock the queue, pick the shards its window takes now, and ask bulk shards to hand back
    when interactive work waits for a worker. The caller publishes the picks, then marks them
    queued, before the transaction ends."""
    now = now or utcnow()
    lock_queue(session, queue, now)
    counts = in_flight(session, queue)
    consumers = queue_consumers(session, settings.worker.lost_after_s, now).get(queue, [])
    window = len(consumers) + settings.scheduling.window_per_queue
    room = {
        ServiceClass.INTERACTIVE: window - counts.on_queue(ServiceClass.INTERACTIVE),
        ServiceClass.BULK: window - counts.on_queue(ServiceClass.INTERACTIVE, ServiceClass.BULK),
    }
    fed = FeedDecision(queue)
    if max(room.values()) > 0:
        jobs = waiting_jobs(session, queue, now)
        if jobs:
            state = share_state(session, settings, counts, room, now)
            limit = max(room.values())
            for pick in pick_shards(jobs, state, _ShardSource(session, queue, limit), limit):
                dispatch = ShardDispatch(pick.shard_id, pick.job.job_id, queue, pick.job.priority)
                fed.dispatches.append((dispatch, pick.job.service_class))
    if settings.scheduling.preempt and queue in settings.scheduling.preempt_queues:
        interactive_fed = sum(1 for _, c in fed.dispatches if c == ServiceClass.INTERACTIVE)
        waiting = counts.here[(ServiceClass.INTERACTIVE, ShardStatus.QUEUED)] + interactive_fed
        running = sum(n for (_, status), n in counts.here.items() if status == ShardStatus.RUNNING)
        idle = max(0, len(consumers) - running)  # from the shard table: exact at this moment
        fed.preempted = request_preemption(session, queue, waiting - idle, now)
    return fed


def request_preemption(session: Session, queue: str, wanted: int, now: datetime) -> int:
    """Ask up to ``wanted`` running bulk shards of ``queue`` to hand back, counting those already
    asked (most recently started first: they have the least to lose). Returns how many were
    asked now."""
    if wanted <= 0:
        return 0
    running_bulk = (
        select(Shard.id, Shard.preempt_requested_at)
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.queue == queue, Shard.status == ShardStatus.RUNNING, Job.service_class == ServiceClass.BULK)
        .order_by(Shard.started_at.desc())
    )
    rows = session.execute(running_bulk).all()
    asked = sum(1 for r in rows if r.preempt_requested_at is not None)
    chosen = [r.id for r in rows if r.preempt_requested_at is None][: max(0, wanted - asked)]
    if chosen:
        session.execute(
            update(Shard)
            .where(Shard.id.in_(chosen), Shard.status == ShardStatus.RUNNING)
            .values(preempt_requested_at=now)
        )
    return len(chosen)


def feed(
    app: Any,
    session_factory: Any,
    settings: FarmSettings,
    queues: list[str] | None = None,
    *,
    charge: Charge | None = None,
    now: datetime | None = None,
) -> int:
    """Top the windows of ``queues`` (default: every GPU queue and ``farm.cpu``) up: pick, publish, then mark
    queued, each queue under its lock in a transaction of its own; ``charge`` goes into the
    ledger with the first. Returns how many shards were sent."""
    sent = 0
    for queue in queues or list(WORK_QUEUES):
        with session_scope(session_factory) as session:
            if charge is not None:
                charge_usage(
                    session,
                    charge.project_id,
                    charge.user_id,
                    charge.seconds,
                    charge.items,
                    settings.scheduling.half_life_s,
                )
                charge = None
            fed = feed_queue(session, settings, queue, now)
            dispatches = [
                ShardDispatch(d.shard_id, d.job_id, d.queue, class_priority(app, c)) for d, c in fed.dispatches
            ]
            labels = shard_labels(session, [d.shard_id for d in dispatches])
            mark_shards_queued(session, publish_shards(app, dispatches, labels=labels))
            sent += len(dispatches)
    return sent


def top_up(app: Any, res: Any, queues: list[str] | None = None, charge: Charge | None = None) -> int:
    """:func:`feed` with a worker's resources (``res``: settings, session factory, ``outlast``),
    waiting out service outages. Returns how many shards were sent."""
    return res.outlast(lambda: feed(app, res.session_factory, res.settings, queues, charge=charge), "feed")


def feed_windows(app: Any, res: Any) -> dict[str, int]:
    """What ``farm.feed_bulk`` does (``farm beat`` sends it every ``scheduling.feed_interval_s``):
    top every queue's window up. Returns the task's result."""
    return {"fed": top_up(app, res)}


def schedule(app: Any, res: Any, job_id: uuid.UUID) -> dict[str, Any]:
    """What a scheduling message does (``farm.schedule_job``): split the job into shards (all
    PENDING) and top its queue's window up (:func:`feed`); the feeder sends the rest
    as shards end. Each step waits out service outages on its own (``res.outlast``). Returns the
    task's result."""

    def split() -> list[str]:  # repeatable: a job already split is left as it is
        with session_scope(res.session_factory) as session:
            if not create_shards(session, job_id):
                return []
            return sorted(set(session.scalars(select(Shard.queue).where(Shard.job_id == job_id).distinct())))

    queues = res.outlast(split, f"job {job_id}: schedule")
    sent = (
        res.outlast(lambda: feed(app, res.session_factory, res.settings, queues), f"job {job_id}: feed")
        if queues
        else 0
    )
    return {"job_id": str(job_id), "shards_sent": sent}
