"""What the reconciler may change to recover shards whose message or worker was lost.

Each function is a guarded ``UPDATE`` that re-checks its condition under the row lock and returns
only the rows it changed, so reconcilers running in several processes at once never act twice on
one shard (candidates are read with ``FOR UPDATE SKIP LOCKED`` on Postgres; SQLite serializes
writers). Functions take a session and never commit: the caller owns the transaction and
publishes the returned shards only after its commit.

- :func:`take_waiting`: shards of running jobs that wait for a message (QUEUED, or PENDING outside
  bulk feeding) and have not changed since ``before``: marked QUEUED with a fresh ``enqueued_at``.
- :func:`take_orphaned`: RUNNING shards whose lease expired (the holder died or was cut off), not
  re-published since ``before``: ``enqueued_at`` refreshed, the next delivery takes them over.
- :func:`fail_crash_loop`: a shard whose lease expired after its last allowed attempt: the worker
  process died on it ``max_attempts`` times, so it fails for good instead of cycling the fleet.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Exists, exists, or_, select, update
from sqlalchemy.orm import Session

from storage.leases import MAX_KEPT_ERRORS
from storage.models import Job, Shard, utcnow
from storage.status import SHARD_TERMINAL, JobStatus, ShardStatus

S = ShardStatus
LEASE_EXPIRED_NOTE = ": lease expired at "  # how claim_shard notes a take-over in the shard's errors


@dataclass(frozen=True)
class Resend:
    """A shard whose message is to be published again."""

    shard_id: uuid.UUID
    job_id: uuid.UUID
    queue: str
    service_class: str  # its job's (storage.status.ServiceClass): the message's priority


def unfinished_shard(job_id: Any) -> Exists:
    """``EXISTS`` a shard of ``job_id`` (a value or a correlated column) that has not ended."""
    return exists().where(Shard.job_id == job_id, Shard.status.not_in(list(SHARD_TERMINAL)))


def _waiting_condition() -> Any:
    """Sent and not taken (PENDING shards are the feeder's: they wait for their turn)."""
    return Shard.status == S.QUEUED


def take_waiting(
    session: Session,
    queue: str,
    before: datetime,
    limit: int,
    *,
    job_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> list[Resend]:
    """Up to ``limit`` waiting shards on ``queue`` unchanged since ``before`` (interactive ones,
    then longest waiting first), marked QUEUED and re-sent now. ``job_id`` limits it to one job."""
    now = now or utcnow()
    query = (
        select(Shard.id, Shard.job_id, Job.service_class)
        .join(Job, Job.id == Shard.job_id)
        .where(Job.status == JobStatus.RUNNING, Shard.queue == queue, Shard.updated_at < before, _waiting_condition())
        .order_by(Job.service_class.desc(), Shard.updated_at, Shard.index)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Shard)
    )
    if job_id is not None:
        query = query.where(Shard.job_id == job_id)
    rows = session.execute(query).all()
    if not rows:
        return []
    service_class = {row.id: row.service_class for row in rows}
    changed = session.execute(
        update(Shard)
        .where(Shard.id.in_(list(service_class)), Shard.updated_at < before, Shard.status == S.QUEUED)
        .values(status=S.QUEUED, enqueued_at=now, updated_at=now)
        .returning(Shard.id, Shard.job_id)
        .execution_options(synchronize_session=False)
    ).all()
    return [Resend(row.id, row.job_id, queue, service_class[row.id]) for row in changed]


@dataclass(frozen=True)
class Orphan:
    """A running shard whose lease has expired."""

    shard_id: uuid.UUID
    job_id: uuid.UUID
    queue: str
    service_class: str  # its job's (storage.status.ServiceClass): the message's priority
    owner: str | None
    attempts: int
    fencing_token: int
    lease_expires_at: datetime


def _not_resent(resent_before: datetime) -> Any:
    """Not re-sent since its lease expired, nor within the stuck period (a re-sent message that
    was lost too is sent once more after it)."""
    return or_(
        Shard.enqueued_at.is_(None), Shard.enqueued_at < Shard.lease_expires_at, Shard.enqueued_at < resent_before
    )


def orphaned_shards(
    session: Session,
    expired_before: datetime,
    resent_before: datetime,
    limit: int,
    *,
    max_attempts: int,
    job_id: uuid.UUID | None = None,
) -> list[Orphan]:
    """RUNNING shards whose lease expired before ``expired_before``: those that were not re-sent
    since, or since ``resent_before``, and every crash loop (``max_attempts`` used), oldest
    expiry first."""
    query = (
        select(
            Shard.id,
            Shard.job_id,
            Shard.queue,
            Job.service_class,
            Shard.lease_owner,
            Shard.attempts,
            Shard.fencing_token,
            Shard.lease_expires_at,
        )
        .join(Job, Job.id == Shard.job_id)
        .where(
            Shard.status == S.RUNNING,
            Shard.lease_expires_at < expired_before,
            or_(Shard.attempts >= max_attempts, _not_resent(resent_before)),
        )
        .order_by(Shard.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Shard)
    )
    if job_id is not None:
        query = query.where(Shard.job_id == job_id)
    return [Orphan(*row) for row in session.execute(query).all()]


def take_orphaned(session: Session, orphan: Orphan, resent_before: datetime, now: datetime | None = None) -> bool:
    """Record that ``orphan`` is re-sent now; False when it changed meanwhile (renewed, taken
    over, finished, or re-sent by another reconciler)."""
    now = now or utcnow()
    result = session.execute(
        update(Shard)
        .where(
            Shard.id == orphan.shard_id,
            Shard.status == S.RUNNING,
            Shard.fencing_token == orphan.fencing_token,
            Shard.lease_expires_at <= now,
            _not_resent(resent_before),
        )
        .values(enqueued_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def fail_crash_loop(
    session: Session, shard_id: uuid.UUID, max_attempts: int, now: datetime | None = None
) -> str | None:
    """Fail a RUNNING shard for good when its lease expired and it has had ``max_attempts``
    attempts: each attempt's worker died or was cut off (a render that kills its process every
    time, as the kernel's OOM killer or a CUDA fault would). Returns the error recorded, or
    ``None`` when the shard is not in that state."""
    now = now or utcnow()
    row = session.execute(
        select(
            Shard.status,
            Shard.attempts,
            Shard.fencing_token,
            Shard.lease_owner,
            Shard.lease_expires_at,
            Shard.errors,
            Shard.failed_workers,
        ).where(Shard.id == shard_id)
    ).one_or_none()
    if (
        row is None
        or row.status != S.RUNNING
        or row.lease_expires_at is None
        or row.lease_expires_at > now
        or row.attempts < max_attempts
    ):
        return None
    errors = list(row.errors or [])
    deaths = 1 + sum(LEASE_EXPIRED_NOTE in str(note) for note in errors)
    error = (
        f"worker process died {deaths} times on this shard (last: {row.lease_owner}, lease expired at "
        f"{row.lease_expires_at.isoformat(timespec='seconds')}); max_attempts {max_attempts} reached"
    )
    workers = list(row.failed_workers or [])
    if row.lease_owner and row.lease_owner not in workers:
        workers.append(row.lease_owner)
    note = f"attempt {row.attempts} by {row.lease_owner}{LEASE_EXPIRED_NOTE}{row.lease_expires_at.isoformat()}"
    result = session.execute(
        update(Shard)
        .where(
            Shard.id == shard_id,
            Shard.status == S.RUNNING,
            Shard.fencing_token == row.fencing_token,
            Shard.lease_expires_at <= now,
        )
        .values(
            status=S.FAILED,
            error=error,
            errors=[*errors, note][-MAX_KEPT_ERRORS:],
            failed_workers=workers,
            lease_expires_at=None,
            fencing_token=row.fencing_token + 1,  # a late write of the dead attempt is refused
            finished_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return error if result.rowcount == 1 else None
