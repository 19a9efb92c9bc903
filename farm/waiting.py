"""Why a job is not moving, in words a person can act on, from the worker registry and the
scheduler's caps.

:func:`why_waiting` looks at the job's waiting shards per queue, at the live workers that consume
each queue (and ``farm.control`` for a job not split yet), and at what holds the feeder back
(:mod:`farm.feeder`):

- "not scheduled yet: no live worker consumes farm.control (start one: farm worker --queues farm.control)"
- "3 shard(s) queued on farm.gpu.sdxl: no live worker consumes it"
- "waiting for a worker: 2 busy on farm.gpu.sd15"
- "project studio is at its cap: 4 shards in flight (farm projects set-share studio --max-running N)"
- "alice is at their cap: 2 shards in flight (farm users set-quota alice --max-running N)"
- "its bulk run stopped feeding at 2026-12-06 06:00 UTC (submit the bulk run again to resume)"
- "after job 1a2b3c4d (frames): running, 3/10 shards done"
- "after job 1a2b3c4d (frames): failed; waits until it is retried and succeeds (farm retry 1a2b3c4d)"
- "4 shard(s) wait for the same shards of job 1a2b3c4d (frames), running: shard 2 waits for its shard 2 (queued)"
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from farm.celery_app import CONTROL_QUEUE
from farm.job_refs import short_id
from farm.settings import FarmSettings
from storage.dependencies import Blocker, blockers, released
from storage.models import BulkJob, Job, Project, Shard, User, utcnow
from storage.registry import queue_consumers
from storage.status import JOB_ENDED_BADLY, DependencyMode, DependencyPolicy, JobStatus, ShardStatus


def why_waiting(
    session: Session,
    job_id: uuid.UUID,
    settings: FarmSettings,
    now: datetime | None = None,
    scope: ColumnElement[bool] | None = None,
) -> list[str]:
    """Reasons the job's unstarted work is waiting (empty when nothing waits or a worker is free).
    ``scope``: the jobs the viewer may open; an upstream outside it is not named."""
    now = now or utcnow()
    job = session.execute(
        select(Job.status, Job.project_id, Job.owner_id, Job.bulk_id).where(Job.id == job_id)
    ).one_or_none()
    if job is None or job.status not in (JobStatus.PENDING, JobStatus.RUNNING):
        return []
    consumers = queue_consumers(session, settings.worker.lost_after_s, now)
    upstream = [dependency_reason(b) for b in blockers(session, job_id, scope)]
    if job.status == JobStatus.PENDING:
        if not consumers.get(CONTROL_QUEUE):
            return [
                f"not scheduled yet: no live worker consumes {CONTROL_QUEUE} "
                f"(start one: farm worker --queues {CONTROL_QUEUE})",
                *upstream,
            ]
        return ["not scheduled yet: waiting for the control worker", *upstream]
    pending = and_(Shard.status == ShardStatus.PENDING, released(job_id, Shard.index))
    sendable = or_(Shard.status == ShardStatus.QUEUED, pending)
    rows = session.execute(
        select(Shard.queue, func.count()).where(Shard.job_id == job_id, sendable).group_by(Shard.queue)
    ).all()
    reasons = upstream + (held_back(session, job, settings, now) if rows else [])
    for queue, waiting in sorted(rows):
        workers = consumers.get(queue, [])
        if not workers:
            reasons.append(f"{waiting} shard(s) queued on {queue}: no live worker consumes it")
            continue
        busy = sum(w.current_shard_id is not None for w in workers)
        if busy == len(workers):
            reasons.append(f"{waiting} shard(s) waiting for a worker: {busy} busy on {queue}")
    return reasons


def dependency_reason(b: Blocker) -> str:
    """One unmet dependency, in words."""
    if b.hidden:
        job = "a job you may not open"
    else:
        job = f"job {short_id(b.upstream_id)}" + (f" ({b.name})" if b.name else "")
    if b.mode == DependencyMode.SHARD:
        theirs = (
            f"its shard {b.first_index} ({b.first_upstream_status.value})"
            if b.first_upstream_status
            else (f"the whole job (it has no shard {b.first_index})")
        )
        state = _ended(b) if b.status in JOB_ENDED_BADLY else b.status.value
        return f"{b.held} shard(s) wait for the same shards of {job}, {state}: shard {b.first_index} waits for {theirs}"
    if b.status in JOB_ENDED_BADLY:
        return f"after {job}: {_ended(b)}"
    done = f", {b.shards_done}/{b.shards_total} shards done" if b.shards_total else ""
    return f"after {job}: {b.status.value}{done}"


def _ended(b: Blocker) -> str:
    """What an upstream that ended badly means for the job waiting on it."""
    if b.policy == DependencyPolicy.CANCEL:
        return f"{b.status.value}; this job is being cancelled (after_policy: cancel)"
    if b.status == JobStatus.CANCELLED:
        return "cancelled, it cannot run again; cancel this job, or submit it again after a new run"
    retry = "its owner retries it" if b.hidden else f"farm retry {short_id(b.upstream_id)}"
    return f"{b.status.value}; waits until it is retried and succeeds ({retry})"


def held_back(session: Session, job: Any, settings: FarmSettings, now: datetime) -> list[str]:
    """What keeps the feeder from sending the job's shards: its project's or owner's cap of shards
    in flight, or its bulk run's feeding window."""
    conf = settings.scheduling
    reasons = []
    if job.bulk_id is not None:
        until = session.scalar(select(BulkJob.feed_until).where(BulkJob.id == job.bulk_id))
        if until is not None and until <= now:
            reasons.append(
                f"its bulk run stopped feeding at {until:%Y-%m-%d %H:%M} UTC (submit the bulk run again to resume)"
            )
    project = session.execute(
        select(Project.name, Project.max_running_shards).where(Project.id == job.project_id)
    ).one()
    user = session.execute(select(User.name, User.max_running_shards).where(User.id == job.owner_id)).one()
    caps = (  # (the cap, whose jobs, how to say it, where to change it)
        (conf.project_cap(project.max_running_shards), Job.project_id == job.project_id,
         f"project {project.name} is at its cap", f"farm projects set-share {project.name} --max-running N"),
        (conf.user_cap(user.max_running_shards), Job.owner_id == job.owner_id,
         f"{user.name} is at their cap", f"farm users set-quota {user.name} --max-running N"),
    )  # fmt: skip
    for cap, whose, said, change in caps:
        if cap and (n := _in_flight(session, whose)) >= cap:
            reasons.append(f"{said}: {n} shards in flight ({change})")
    return reasons


def _in_flight(session: Session, whose: Any) -> int:
    """Shards queued or running of the jobs ``whose`` selects."""
    flying = Shard.status.in_([ShardStatus.QUEUED, ShardStatus.RUNNING])
    return int(session.scalar(select(func.count()).select_from(Shard).join(Job).where(whose, flying)) or 0)
