"""The one place that accepts or refuses a change of job or shard status.

Every change is a guarded ``UPDATE ... WHERE id = :id AND status IN (:allowed_from)``: when the
row is not in a state the table allows, nothing is written and :class:`InvalidTransition` says
what was attempted from what. Functions take a session and never commit: the caller owns the
transaction.

Job:   pending -> running | failed | cancelled;  running -> succeeded | partial | failed | cancelled;
       partial | failed -> running (retry of failed shards).
Shard: pending -> queued | running | cancelled;  queued -> running | failed | cancelled;
       running -> succeeded | failed | queued (retryable failure) | pending (preempted) | cancelled;
       failed -> queued (retry) | pending (a retry: fed again by the feeder).

A job's status change and its roll-ups also write the job's webhook events to the outbox
(:mod:`storage.webhook_outbox`), in the same transaction: an event exists exactly when its
change was committed.

Shard leases (claims, heartbeats, fencing, and the end of a leased attempt) live in
:mod:`storage.leases`, which asks the tables here whether each status it writes is allowed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.chunking import chunked
from storage.errors import InvalidTransition, NotFound, UserError
from storage.models import Job, Shard, utcnow
from storage.status import JOB_TERMINAL, SHARD_TERMINAL, JobStatus, ServiceClass, ShardStatus
from storage.webhook_outbox import record_progress_event, record_status_event

J, S = JobStatus, ShardStatus

JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    J.PENDING: frozenset({J.RUNNING, J.FAILED, J.CANCELLED}),
    J.RUNNING: frozenset({J.SUCCEEDED, J.PARTIAL, J.FAILED, J.CANCELLED}),
    J.PARTIAL: frozenset({J.RUNNING}),
    J.FAILED: frozenset({J.RUNNING}),
    J.SUCCEEDED: frozenset(),
    J.CANCELLED: frozenset(),
}

SHARD_TRANSITIONS: dict[ShardStatus, frozenset[ShardStatus]] = {
    # pending -> running: a worker may receive the message before the scheduler marks it queued.
    S.PENDING: frozenset({S.QUEUED, S.RUNNING, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    # running -> pending: preempted between items, to be fed again (storage.leases.hand_back).
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.QUEUED, S.PENDING, S.CANCELLED}),
    S.FAILED: frozenset({S.QUEUED, S.PENDING}),  # pending: a bulk job's retry, fed again in windows
    S.SUCCEEDED: frozenset(),
    S.CANCELLED: frozenset(),
}


def _sources(table: dict[Any, frozenset[Any]], to: Any) -> list[Any]:
    return [frm for frm, targets in table.items() if to in targets]


def check_job_transition(frm: JobStatus, to: JobStatus) -> None:
    if to not in JOB_TRANSITIONS[JobStatus(frm)]:
        raise InvalidTransition(f"job status {JobStatus(frm).value} -> {JobStatus(to).value} is not allowed")


def check_shard_transition(frm: ShardStatus, to: ShardStatus) -> None:
    if to not in SHARD_TRANSITIONS[ShardStatus(frm)]:
        raise InvalidTransition(f"shard status {ShardStatus(frm).value} -> {ShardStatus(to).value} is not allowed")


def _guarded(session: Session, model: type, row_id: uuid.UUID, to: Any, allowed: list[Any], values: dict) -> None:
    what = model.__tablename__
    if allowed:
        result = session.execute(
            update(model)
            .where(model.id == row_id, model.status.in_(allowed))
            .values(status=to, updated_at=utcnow(), **values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            return
    current = session.scalar(select(model.status).where(model.id == row_id))
    if current is None:
        raise NotFound(f"no {what} {row_id}")
    raise InvalidTransition(f"{what} {row_id}: status {current.value} -> {to.value} is not allowed")


def set_job_status(
    session: Session, job_id: uuid.UUID, to: JobStatus, *, expected: JobStatus | None = None, **values: Any
) -> None:
    """Move a job to ``to`` (optionally only from ``expected``), writing ``values`` with it, and
    its webhook's event of the change (if it has a webhook) to the outbox."""
    allowed = _sources(JOB_TRANSITIONS, to)
    if expected is not None:
        check_job_transition(expected, to)
        allowed = [expected]
    if to in JOB_TERMINAL:
        values.setdefault("finished_at", utcnow())
    _guarded(session, Job, job_id, to, allowed, values)
    record_status_event(session, job_id, to)


MAX_PRIORITY = 9  # as a job spec allows


def set_job_priority(session: Session, job_id: uuid.UUID, priority: int) -> None:
    """Change a job's priority (0-9); a job that has ended keeps the one it ran with."""
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
        raise UserError(f"priority: give a whole number from 0 to {MAX_PRIORITY}, not {priority!r}")
    _change_unended_job(session, job_id, "priority", priority=priority)


def set_job_class(session: Session, job_id: uuid.UUID, service_class: str) -> None:
    """Move a job to the ``interactive`` or ``bulk`` class (the feeder sends interactive work
    first); a job that has ended keeps the one it ran with."""
    try:
        chosen = ServiceClass(service_class)
    except ValueError:
        raise UserError(f"service_class: give interactive or bulk, not {service_class!r}") from None
    _change_unended_job(session, job_id, "class", service_class=chosen)


def _change_unended_job(session: Session, job_id: uuid.UUID, what: str, **values: Any) -> None:
    """Write ``values`` on a job that has not ended; :class:`NotFound` or :class:`InvalidTransition`
    (naming ``what`` no longer matters) otherwise."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(list(JOB_TERMINAL)))
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status is None:
            raise NotFound(f"no job {job_id}")
        raise InvalidTransition(f"job {job_id} is {JobStatus(status).value}: its {what} no longer matters")


def set_shard_status(
    session: Session, shard_id: uuid.UUID, to: ShardStatus, *, expected: ShardStatus | None = None, **values: Any
) -> None:
    """Move a shard to ``to`` (optionally only from ``expected``). Leased changes of a running
    shard go through :func:`storage.leases.finish_shard` / :func:`~storage.leases.release_shard_for_retry`
    instead."""
    allowed = _sources(SHARD_TRANSITIONS, to)
    if expected is not None:
        check_shard_transition(expected, to)
        allowed = [expected]
    if to in SHARD_TERMINAL:
        values.setdefault("finished_at", utcnow())
    _guarded(session, Shard, shard_id, to, allowed, values)


def mark_shards_queued(session: Session, shard_ids: list[uuid.UUID]) -> int:
    """Pending -> queued for shards whose messages are on the broker (ones a worker already
    claimed are left alone). Returns how many changed."""
    now = utcnow()
    changed = 0
    for chunk in chunked(shard_ids):  # one IN list per statement stays far below the driver's limit
        result = session.execute(
            update(Shard)
            .where(Shard.id.in_(chunk), Shard.status == S.PENDING)
            .values(status=S.QUEUED, enqueued_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        changed += result.rowcount
    return changed


def cancel_unstarted_shards(session: Session, job_id: uuid.UUID) -> int:
    """Cancel every pending or queued shard of a job; returns how many. Running shards stop
    on their own when they see the job cancelled."""
    result = session.execute(
        update(Shard)
        .where(Shard.job_id == job_id, Shard.status.in_([S.PENDING, S.QUEUED]))
        .values(status=S.CANCELLED, finished_at=utcnow(), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


# -- job roll-up --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRollup:
    """A job's counts from its shards, and the final status they imply once all are terminal."""

    shards_total: int
    shards_done: int
    shards_failed: int
    shards_cancelled: int
    items_total: int
    items_done: int
    items_failed: int

    @property
    def all_terminal(self) -> bool:
        return self.shards_total > 0 and (
            self.shards_done + self.shards_failed + self.shards_cancelled == self.shards_total
        )

    @property
    def final_status(self) -> JobStatus | None:
        if not self.all_terminal:
            return None
        if self.shards_done == self.shards_total:
            return J.SUCCEEDED
        if self.shards_cancelled:
            return J.CANCELLED
        return J.FAILED if self.shards_done == 0 else J.PARTIAL


def claim_rollup(session: Session, job_id: uuid.UUID, every_s: float, now: datetime | None = None) -> bool:
    """Whether the caller should have a running job rolled up now: true for one caller per
    ``every_s`` (the job row was last written longer ago; it is touched to say a roll-up is on its
    way), so shards ending fast do not recompute the job's counts one by one."""
    now = now or utcnow()
    c = Job.__table__.c  # a Core statement: no ORM bookkeeping on every shard's finish
    result = session.execute(
        update(Job.__table__)
        .where(c.id == job_id, c.status == JobStatus.RUNNING, c.updated_at <= now - timedelta(seconds=every_s))
        .values(updated_at=now)
    )
    return result.rowcount == 1


def refresh_job_counts(session: Session, job_id: uuid.UUID) -> JobRollup:
    """Recompute the job's counts from its shards and store them (status is left alone).

    Locks the job row first (``FOR UPDATE``; SQLite serializes writers anyway): without it, two
    workers finishing the last two shards in concurrent transactions each count the other's shard
    as still running, neither sees the job end, and the stored counts are stale."""
    status = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
    if status is None:
        raise NotFound(f"no job {job_id}")
    rows = session.execute(
        select(Shard.status, func.count(), func.sum(Shard.items_total), func.sum(Shard.items_done))
        .where(Shard.job_id == job_id)
        .group_by(Shard.status)
    ).all()
    by_status = {ShardStatus(status): (int(n), int(total or 0), int(done or 0)) for status, n, total, done in rows}

    def count(status: ShardStatus, column: int = 0) -> int:
        return by_status.get(status, (0, 0, 0))[column]

    rollup = JobRollup(
        shards_total=sum(v[0] for v in by_status.values()),
        shards_done=count(S.SUCCEEDED),
        shards_failed=count(S.FAILED),
        shards_cancelled=count(S.CANCELLED),
        items_total=sum(v[1] for v in by_status.values()),
        items_done=sum(v[2] for v in by_status.values()),
        items_failed=count(S.FAILED, 1) - count(S.FAILED, 2),
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            shards_total=rollup.shards_total,
            shards_done=rollup.shards_done,
            shards_failed=rollup.shards_failed,
            items_total=rollup.items_total,
            items_done=rollup.items_done,
            items_failed=rollup.items_failed,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise NotFound(f"no job {job_id}")
    if not rollup.all_terminal and status == J.RUNNING:  # an ending job reports its end, not a last progress
        record_progress_event(session, job_id, rollup.items_done)
    return rollup
