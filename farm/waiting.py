"""Why a job is not moving, in words a person can act on, from the worker registry.

:func:`why_waiting` looks at the job's waiting shards per queue and at the live workers that
consume each queue (and ``farm.control`` for a job not split yet):

- "not scheduled yet: no live worker consumes farm.control (start one: farm worker --queues farm.control)"
- "3 shard(s) queued on farm.gpu.sdxl: no live worker consumes it"
- "waiting for a worker: 2 busy on farm.gpu.sd15"
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.celery_app import CONTROL_QUEUE
from storage.models import Job, Shard, utcnow
from storage.registry import queue_consumers
from storage.status import JobStatus, ShardStatus


def why_waiting(session: Session, job_id: uuid.UUID, lost_after_s: float, now: datetime | None = None) -> list[str]:
    """Reasons the job's unstarted work is waiting (empty when nothing waits or a worker is free)."""
    now = now or utcnow()
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status not in (JobStatus.PENDING, JobStatus.RUNNING):
        return []
    consumers = queue_consumers(session, lost_after_s, now)
    if status == JobStatus.PENDING:
        if not consumers.get(CONTROL_QUEUE):
            return [
                f"not scheduled yet: no live worker consumes {CONTROL_QUEUE} "
                f"(start one: farm worker --queues {CONTROL_QUEUE})"
            ]
        return ["not scheduled yet: waiting for the control worker"]
    rows = session.execute(
        select(Shard.queue, func.count())
        .where(Shard.job_id == job_id, Shard.status.in_([ShardStatus.PENDING, ShardStatus.QUEUED]))
        .group_by(Shard.queue)
    ).all()
    reasons = []
    for queue, waiting in sorted(rows):
        workers = consumers.get(queue, [])
        if not workers:
            reasons.append(f"{waiting} shard(s) queued on {queue}: no live worker consumes it")
            continue
        busy = sum(w.current_shard_id is not None for w in workers)
        if busy == len(workers):
            reasons.append(f"{waiting} shard(s) waiting for a worker: {busy} busy on {queue}")
    return reasons
