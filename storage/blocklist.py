"""Per job and worker failure streaks, and the blocklist they lead to.

A worker whose attempts at one job's shards fail ``block_after`` times in a row (failures a
retry could fix: a bad GPU, a corrupt local file, not a bad spec) is blocked from that job: it
hands the job's shards back for other workers. A success resets the streak. Callers own the
transaction; one worker process writes only its own rows, one shard at a time.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import JobWorker, utcnow
from storage.registry import live_workers


def record_failure_streak(
    session: Session, job_id: uuid.UUID, worker: str, error: str, *, block_after: int, now: datetime | None = None
) -> bool:
    """Count a failed attempt of ``worker`` at one of the job's shards; returns True when this
    failure blocks it (``block_after`` in a row; 0 never blocks)."""
    now = now or utcnow()
    row = session.get(JobWorker, (job_id, worker))
    if row is None:
        row = JobWorker(job_id=job_id, worker=worker, failures_in_a_row=0, failures=0, successes=0)
        session.add(row)
    row.failures_in_a_row += 1
    row.failures += 1
    row.last_error = error[:2000]
    row.updated_at = now
    newly_blocked = bool(block_after) and row.blocked_at is None and row.failures_in_a_row >= block_after
    if newly_blocked:
        row.blocked_at = now
    session.flush()
    return newly_blocked


def record_success(session: Session, job_id: uuid.UUID, worker: str) -> None:
    """A shard of the job succeeded on ``worker``: its failure streak ends (no row, no write)."""
    session.execute(
        update(JobWorker)
        .where(JobWorker.job_id == job_id, JobWorker.worker == worker)
        .values(failures_in_a_row=0, successes=JobWorker.successes + 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def has_record(session: Session, job_id: uuid.UUID, worker: str) -> bool:
    """Whether ``worker`` has failed at the job before (a row exists: a streak, a block)."""
    found = session.scalar(select(JobWorker.worker).where(JobWorker.job_id == job_id, JobWorker.worker == worker))
    return found is not None


def is_blocked(session: Session, job_id: uuid.UUID, worker: str) -> bool:
    blocked_at = session.scalar(
        select(JobWorker.blocked_at).where(JobWorker.job_id == job_id, JobWorker.worker == worker)
    )
    return blocked_at is not None


def blocked_workers(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The workers blocked from a job, with their streak and last error."""
    rows = session.scalars(
        select(JobWorker)
        .where(JobWorker.job_id == job_id, JobWorker.blocked_at.is_not(None))
        .order_by(JobWorker.blocked_at)
    )
    return [
        {
            "worker": r.worker,
            "failures_in_a_row": r.failures_in_a_row,
            "failures": r.failures,
            "blocked_at": r.blocked_at.isoformat(),
            "last_error": r.last_error,
        }
        for r in rows
    ]


def unblocked_workers(session: Session, job_id: uuid.UUID, queue: str, lost_after_s: float) -> list[str]:
    """Live workers consuming ``queue`` that are not blocked from the job."""
    blocked = set(
        session.scalars(select(JobWorker.worker).where(JobWorker.job_id == job_id, JobWorker.blocked_at.is_not(None)))
    )
    return [name for name in live_workers(session, queue, lost_after_s) if name not in blocked]
