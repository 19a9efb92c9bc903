"""Job lifecycle on the control side: submit, split into shards, finalize.

Functions take a session (the caller commits) and return what must be sent to the broker after
the commit, so a message never refers to rows that are not yet visible. Every step is safe to
run twice: a redelivered scheduling message re-sends only shards that are still pending, and
finalizing a job that is already final rewrites nothing but its manifest.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.errors import NotFound, UserError
from farm.sharding import plan_shards
from farm.specs import JobSpec, parse_spec, spec_fingerprint
from storage.blocklist import blocked_workers
from storage.models import Job, Shard, utcnow
from storage.status import JOB_TERMINAL, JobStatus, ShardStatus
from storage.transitions import JobRollup, refresh_job_counts, set_job_status


@dataclass(frozen=True)
class ShardDispatch:
    """One shard message to publish: which shard, on which queue, at which priority."""

    shard_id: uuid.UUID
    job_id: uuid.UUID
    queue: str
    priority: int


def job_row(spec: JobSpec, **values: Any) -> Job:
    """A new ``job`` row for ``spec``; ``values`` sets the status and anything else."""
    values.setdefault("spec_hash", spec_fingerprint(spec))
    return Job(
        kind=spec.kind,
        family=spec.family,
        priority=spec.priority,
        spec=spec.model_dump(mode="json"),
        output_prefix=spec.output_prefix,
        **values,
    )


def submit_job(session: Session, spec: JobSpec) -> tuple[Job, bool]:
    """Write the job row. With an idempotency key, a resubmission returns the existing job
    (``created`` False); the same key with a different spec is refused."""
    fingerprint = spec_fingerprint(spec)
    key = spec.idempotency_key
    if key:
        existing = session.scalar(select(Job).where(Job.idempotency_key == key))
        if existing is not None:
            return _same_spec(existing, fingerprint, key), False
    job = job_row(spec, status=JobStatus.PENDING, spec_hash=fingerprint, idempotency_key=key)
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        # Another submitter won the race for this idempotency key.
        existing = session.scalar(select(Job).where(Job.idempotency_key == key))
        if existing is None:
            raise
        return _same_spec(existing, fingerprint, key), False
    return job, True


def _same_spec(job: Job, fingerprint: str, key: str | None) -> Job:
    if job.spec_hash != fingerprint:
        raise UserError(f"idempotency_key {key!r} was already used for job {job.id} with a different spec")
    return job


def schedule_job(session: Session, job_id: uuid.UUID) -> list[ShardDispatch]:
    """Split a pending job into shards (deterministically) and mark it running. Returns the
    shards to publish: all of them the first time, the still-pending ones on a redelivery."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.status == JobStatus.PENDING:
        spec = parse_spec(job.spec)
        plans = plan_shards(spec, job.id)
        session.add_all(
            Shard(
                job_id=job.id,
                index=plan.index,
                queue=plan.queue,
                status=ShardStatus.PENDING,
                params=plan.to_params(),
                items_total=len(plan.items),
            )
            for plan in plans
        )
        session.flush()
        set_job_status(
            session,
            job.id,
            JobStatus.RUNNING,
            expected=JobStatus.PENDING,
            started_at=utcnow(),
            shards_total=len(plans),
            items_total=sum(len(p.items) for p in plans),
        )
    elif job.status != JobStatus.RUNNING:
        return []
    rows = session.execute(
        select(Shard.id, Shard.queue)
        .where(Shard.job_id == job.id, Shard.status == ShardStatus.PENDING)
        .order_by(Shard.index)
    ).all()
    return [ShardDispatch(row.id, job.id, row.queue, job.priority) for row in rows]


def requeue_failed(session: Session, job_id: uuid.UUID) -> tuple[int, list[ShardDispatch]]:
    """Put a job's failed shards back in the queue (``farm retry``); the job runs again. Returns
    how many and the messages to send. A bulk job's shards go back to PENDING instead, for the
    feeder to send in windows (no messages)."""
    from storage.transitions import set_shard_status

    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    failed = session.execute(
        select(Shard.id, Shard.queue).where(Shard.job_id == job_id, Shard.status == ShardStatus.FAILED)
    ).all()
    if not failed:
        return 0, []
    to = ShardStatus.PENDING if job.bulk_id is not None else ShardStatus.QUEUED
    for row in failed:
        set_shard_status(session, row.id, to, expected=ShardStatus.FAILED, enqueued_at=utcnow(), error=None)
    if job.status in (JobStatus.PARTIAL, JobStatus.FAILED):
        set_job_status(session, job_id, JobStatus.RUNNING, finished_at=None, error=None, outputs_written_at=None)
    if job.bulk_id is not None:
        return len(failed), []
    return len(failed), [ShardDispatch(row.id, job_id, row.queue, job.priority) for row in failed]


def finalize_job(session: Session, job_id: uuid.UUID) -> tuple[JobRollup, JobStatus]:
    """Roll the shards up into the job. When every shard is terminal the job becomes SUCCEEDED,
    PARTIAL, FAILED (or stays CANCELLED); returns the roll-up and the job's status."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    rollup = refresh_job_counts(session, job_id)
    status = JobStatus(job.status)
    final = rollup.final_status
    if final is not None and status not in JOB_TERMINAL:
        error = None
        if final in (JobStatus.FAILED, JobStatus.PARTIAL):
            error = f"{rollup.shards_failed} of {rollup.shards_total} shards failed"
        set_job_status(session, job_id, final, expected=status, error=error)
        status = final
    return rollup, status


def job_summary(session: Session, job_id: uuid.UUID) -> dict[str, Any]:
    """A job and its shards as plain data (for the CLI, the client and the manifest)."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    shards = session.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.index)).all()
    items_done = sum(s.items_done for s in shards)
    return {
        "id": str(job.id),
        "kind": job.kind,
        "family": job.family,
        "status": JobStatus(job.status).value,
        "priority": job.priority,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "items_total": job.items_total,
        "items_done": items_done,
        **_pace(job, items_done),
        "shards_total": len(shards),
        "shards_done": sum(s.status == ShardStatus.SUCCEEDED for s in shards),
        "shards_failed": sum(s.status == ShardStatus.FAILED for s in shards),
        "error": job.error,
        "blocked_workers": blocked_workers(session, job_id),
        "shards": [
            {
                "index": s.index,
                "id": str(s.id),
                "queue": s.queue,
                "status": ShardStatus(s.status).value,
                "items_done": s.items_done,
                "items_total": s.items_total,
                "progress": round(s.progress, 4),
                "attempts": s.attempts,
                "worker": s.lease_owner,
                "error": s.error,
                "errors": list(s.errors or []),
                "failed_workers": list(s.failed_workers or []),
                "timings": dict(s.timings or {}),
            }
            for s in shards
        ],
    }


def _pace(job: Job, items_done: int, now: datetime | None = None) -> dict[str, float | None]:
    """Observed seconds per item since the job started (all workers together) and the time left
    at that pace; ``None`` until an item is done, and for a finished job's ETA."""
    if job.started_at is None or items_done == 0:
        return {"seconds_per_item": None, "eta_s": None}
    end = job.finished_at or now or utcnow()
    per_item = max(0.0, (end - job.started_at).total_seconds()) / items_done
    remaining = max(0, job.items_total - items_done - job.items_failed)
    running = JobStatus(job.status) == JobStatus.RUNNING
    return {"seconds_per_item": round(per_item, 3), "eta_s": round(per_item * remaining, 1) if running else None}


def parse_job_id(value: str | uuid.UUID) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise UserError(f"job id {value!r} is not a UUID") from None
