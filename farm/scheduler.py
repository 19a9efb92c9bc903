"""Job lifecycle on the control side: submit, split into shards, finalize.

Functions take a session (the caller commits) and return what must be sent to the broker after
the commit, so a message never refers to rows that are not yet visible. Every step is safe to
run twice: a redelivered scheduling message re-sends only shards that are still pending, and
finalizing a job that is already final rewrites nothing but its manifest.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.dependencies import resolve_after
from farm.errors import NotFound, UserError
from farm.job_spec import JobSpec
from farm.quotas import check_items
from farm.settings import SchedulingSettings, WebhooksSettings
from farm.sharding import iter_shards
from farm.specs import parse_spec, spec_fingerprint
from farm.steps import post_step_specs, resolve_step
from farm.webhooks import attach_job_webhook
from storage.blocklist import blocked_workers
from storage.chunking import insert_rows
from storage.dependencies import add_dependencies, cancel_broken_dependents, released
from storage.identity import ensure_default_identity
from storage.models import Job, Project, Shard, User, utcnow
from storage.status import JOB_TERMINAL, JobStatus, ServiceClass, ShardStatus
from storage.transitions import JobRollup, refresh_job_counts, set_job_status, set_shard_status


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
        name=spec.name,
        **values,
    )


def owner_and_project(
    session: Session, owner_id: uuid.UUID | None, project_id: uuid.UUID | None
) -> tuple[uuid.UUID, uuid.UUID]:
    """Who a submit is recorded as: the ids given, or (direct mode, the admin on the control
    host) the user ``admin`` and the project ``default``."""
    if owner_id is None or project_id is None:
        admin, default = ensure_default_identity(session)
        owner_id = admin.id if owner_id is None else owner_id
        project_id = default.id if project_id is None else project_id
    return owner_id, project_id


def submit_job(
    session: Session,
    spec: JobSpec,
    *,
    owner_id: uuid.UUID | None = None,
    project_id: uuid.UUID | None = None,
    quotas: SchedulingSettings | None = None,
    webhooks: WebhooksSettings | None = None,
    parent_job_id: uuid.UUID | None = None,
    scope: Any = None,
    pin: Callable[[JobSpec], JobSpec] | None = None,
) -> tuple[Job, bool]:
    """Write the job row, owned by ``owner_id`` in ``project_id`` (by default: ``admin`` in
    ``default``), refused when it passes the ``quotas`` (:mod:`farm.quotas`), with the upstream
    jobs its ``after`` names (:func:`farm.dependencies.resolve_after`; ``scope``: a condition on
    :class:`Job`, the jobs the submitter may see, ``None`` for all); with ``webhooks``, its webhook
    too (:func:`farm.webhooks.attach_job_webhook`: the spec's, else the owner's). With an
    idempotency key, a resubmission returns the existing job (``created`` False); the same key
    with a different spec is refused. A job whose ``cancel``-policy upstream has already ended
    badly is cancelled at once. ``parent_job_id``: the job this one re-runs. The spec's
    ``post_steps`` become jobs of their own after this one, in the same transaction. ``pin``: what
    makes the spec's model references exact (:func:`farm.model_registry.pin_spec_model`), called
    once a step has its model and family from its source, for the spec and each post-step."""
    spec = resolve_step(session, spec, owner_id)  # a post-step: its source checked, its outputs placed
    if pin is not None:
        spec = pin(spec)
    fingerprint = spec_fingerprint(spec)
    key = spec.idempotency_key
    if key:
        existing = session.scalar(select(Job).where(Job.idempotency_key == key))
        if existing is not None:
            return _same_spec(existing, fingerprint, key, owner_id), False
    owner, project = owner_and_project(session, owner_id, project_id)
    items = spec.item_count()
    if quotas is not None:
        check_items(session, quotas, owner, items)
    upstreams = resolve_after(session, spec, owner, scope) if spec.after else []
    job = job_row(
        spec,
        status=JobStatus.PENDING,
        spec_hash=fingerprint,
        idempotency_key=key,
        owner_id=owner,
        project_id=project,
        items_total=items,
        parent_job_id=parent_job_id,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
            if upstreams:
                add_dependencies(session, job.id, upstreams)
    except IntegrityError:
        # Another submitter won the race for this idempotency key.
        existing = session.scalar(select(Job).where(Job.idempotency_key == key))
        if existing is None:
            raise
        return _same_spec(existing, fingerprint, key, owner_id), False
    if webhooks is not None:
        attach_job_webhook(session, job.id, spec, owner, webhooks)
    if upstreams and cancel_broken_dependents(session, dependent_ids=[job.id]):
        session.refresh(job)
    for step in post_step_specs(spec, job.id):  # jobs of their own, after this one (farm/steps.py)
        submit_job(session, step, owner_id=owner, project_id=project, webhooks=webhooks, pin=pin)
    return job, True


def _same_spec(job: Job, fingerprint: str, key: str | None, owner_id: uuid.UUID | None) -> Job:
    if owner_id is not None and job.owner_id != owner_id:  # someone else's job: say nothing of it
        raise UserError(f"idempotency_key {key!r} is already in use; choose another")
    if job.spec_hash != fingerprint:
        raise UserError(f"idempotency_key {key!r} was already used for job {job.id} with a different spec")
    return job


def schedule_job(session: Session, job_id: uuid.UUID) -> list[ShardDispatch]:
    """Split a pending job into shards (deterministically) and mark it running. Returns the
    shards to publish: all of them the first time, the still-pending ones on a redelivery."""
    if not create_shards(session, job_id):
        return []
    return pending_dispatches(session, job_id)


def create_shards(session: Session, job_id: uuid.UUID) -> bool:
    """Insert a pending job's shards (deterministically; a statement per few hundred rows, the
    plans built as they are inserted) and mark the job running. Returns whether the job is
    running, i.e. may have shards to send; a job already running is left as it is."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.status == JobStatus.PENDING:
        spec = parse_spec(job.spec)
        items = 0

        def rows() -> Iterator[dict[str, Any]]:
            nonlocal items
            for plan in iter_shards(spec, job.id):
                items += len(plan.items)
                yield {
                    "id": uuid.uuid4(),
                    "job_id": job.id,
                    "index": plan.index,
                    "queue": plan.queue,
                    "status": ShardStatus.PENDING,
                    "params": plan.to_params(),
                    "items_total": len(plan.items),
                }

        shards = insert_rows(session, Shard, rows())
        set_job_status(
            session,
            job.id,
            JobStatus.RUNNING,
            expected=JobStatus.PENDING,
            started_at=utcnow(),
            shards_total=shards,
            items_total=items,
        )
        return True
    return job.status == JobStatus.RUNNING


def pending_dispatches(session: Session, job_id: uuid.UUID) -> list[ShardDispatch]:
    """Every PENDING shard of the job that its dependencies release (:mod:`storage.dependencies`), in order."""
    rows = session.execute(
        select(Shard.id, Shard.queue, Job.priority)
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING, released(Shard.job_id, Shard.index))
        .order_by(Shard.index)
    )
    return [ShardDispatch(row.id, job_id, row.queue, row.priority) for row in rows]


def requeue_failed(session: Session, job_id: uuid.UUID) -> int:
    """Put a job's failed shards back to PENDING (``farm retry``), for the feeder to send in their
    turn; the job runs again. Returns how many."""

    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    failed = session.execute(
        select(Shard.id, Shard.queue).where(Shard.job_id == job_id, Shard.status == ShardStatus.FAILED)
    ).all()
    if not failed:
        return 0
    for row in failed:
        set_shard_status(session, row.id, ShardStatus.PENDING, expected=ShardStatus.FAILED, error=None)
    if job.status in (JobStatus.PARTIAL, JobStatus.FAILED):
        set_job_status(session, job_id, JobStatus.RUNNING, finished_at=None, error=None, outputs_written_at=None)
    return len(failed)


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


def job_summary(session: Session, job_id: uuid.UUID, *, shard_limit: int | None = None) -> dict[str, Any]:
    """A job and its shards as plain data (for the CLI, the client and the manifest).

    Every shard by default. With ``shard_limit`` (the client's and the CLI's default) the counts
    come from one aggregate and at most ``shard_limit`` shards are listed, the ones worth
    showing (:func:`shards_worth_showing`); a job with no more shards than that lists them all.
    ``shards_by_status`` counts every shard; ``shards_listed`` says how many are listed."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    shard_rows: list[Any] | None = None
    if shard_limit is None:
        shard_rows = session.execute(_shard_query(job_id).order_by(Shard.index)).all()
        by_status, items_done = _counts(shard_rows)
    else:
        by_status, items_done = _aggregate_counts(session, job_id)
        if sum(by_status.values()) <= shard_limit:
            shard_rows = session.execute(_shard_query(job_id).order_by(Shard.index)).all()
            by_status, items_done = _counts(shard_rows)
        else:
            shard_rows = shards_worth_showing(session, job_id, shard_limit)
    owner, project = session.execute(
        select(
            select(User.name).where(User.id == job.owner_id).scalar_subquery(),
            select(Project.name).where(Project.id == job.project_id).scalar_subquery(),
        )
    ).one()
    return {
        "id": str(job.id),
        "owner": owner,
        "project": project,
        "kind": job.kind,
        "family": job.family,
        "status": JobStatus(job.status).value,
        "priority": job.priority,
        "service_class": ServiceClass(job.service_class).value,
        "parent_job_id": str(job.parent_job_id) if job.parent_job_id else None,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "items_total": job.items_total,
        "items_done": items_done,
        **_pace(job, items_done),
        "shards_total": sum(by_status.values()),
        "shards_done": by_status.get(ShardStatus.SUCCEEDED.value, 0),
        "shards_failed": by_status.get(ShardStatus.FAILED.value, 0),
        "shards_by_status": by_status,
        "shards_listed": len(shard_rows),
        "error": job.error,
        "blocked_workers": blocked_workers(session, job_id),
        "shards": [_shard_data(row) for row in shard_rows],
    }


SUMMARY_SHARDS = 20  # shards a summarized job lists: failed, running, most recently changed


def shards_worth_showing(session: Session, job_id: uuid.UUID, limit: int) -> list[Any]:
    """At most ``limit`` of the job's shards, in index order: up to half of them failed ones and
    a quarter running ones (most recently changed first), the rest the most recently changed of
    any status (topped up with more failed or running ones when there are not enough)."""
    if limit <= 0:
        return []
    newest = (Shard.updated_at.desc(), Shard.index)
    failed = session.execute(
        _shard_query(job_id).where(Shard.status == ShardStatus.FAILED).order_by(*newest).limit(limit)
    ).all()
    running = session.execute(
        _shard_query(job_id).where(Shard.status == ShardStatus.RUNNING).order_by(*newest).limit(limit)
    ).all()
    latest = session.execute(_shard_query(job_id).order_by(*newest).limit(limit)).all()
    chosen: dict[uuid.UUID, Any] = {}
    for rows, share in (
        (failed, -(-limit // 2)),
        (running, -(-limit // 4)),
        (latest, limit),
        (failed, limit),
        (running, limit),
    ):
        for row in rows[:share]:
            if len(chosen) >= limit:
                break
            chosen.setdefault(row.id, row)
    return sorted(chosen.values(), key=lambda row: row.index)


def _shard_query(job_id: uuid.UUID) -> Any:
    """The columns a summary shows of the job's shards (not their params)."""
    return select(
        Shard.index,
        Shard.id,
        Shard.queue,
        Shard.status,
        Shard.items_done,
        Shard.items_total,
        Shard.progress,
        Shard.attempts,
        Shard.lease_owner,
        Shard.error,
        Shard.errors,
        Shard.failed_workers,
        Shard.timings,
    ).where(Shard.job_id == job_id)


def _counts(rows: list[Any]) -> tuple[dict[str, int], int]:
    by_status: dict[str, int] = {}
    for row in rows:
        key = ShardStatus(row.status).value
        by_status[key] = by_status.get(key, 0) + 1
    return by_status, sum(row.items_done for row in rows)


def _aggregate_counts(session: Session, job_id: uuid.UUID) -> tuple[dict[str, int], int]:
    """Shards per status and items done, counted by the database."""
    rows = session.execute(
        select(Shard.status, func.count(), func.sum(Shard.items_done))
        .where(Shard.job_id == job_id)
        .group_by(Shard.status)
    ).all()
    return {ShardStatus(status).value: int(n) for status, n, _ in rows}, sum(int(done or 0) for *_, done in rows)


def _shard_data(row: Any) -> dict[str, Any]:
    return {
        "index": row.index,
        "id": str(row.id),
        "queue": row.queue,
        "status": ShardStatus(row.status).value,
        "items_done": row.items_done,
        "items_total": row.items_total,
        "progress": round(row.progress, 4),
        "attempts": row.attempts,
        "worker": row.lease_owner,
        "error": row.error,
        "errors": list(row.errors or []),
        "failed_workers": list(row.failed_workers or []),
        "timings": dict(row.timings or {}),
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
