"""The render task: one shard per message, executed under a database lease."""

from __future__ import annotations

import uuid

from celery import shared_task
from sqlalchemy import select

from farm.dispatch import publish_finalize, publish_shard
from farm.worker.runtime import execute_shard
from storage.db import session_scope
from storage.models import Job, Shard
from tasks.resources import worker_resources


@shared_task(bind=True, name="farm.render_shard")
def render_shard(self, shard_id: str, job_id: str, sent_at: float | None = None) -> dict:
    res = worker_resources(self.app)
    shard = uuid.UUID(shard_id)
    outcome = execute_shard(res, shard, sent_at)
    if outcome.retry_in is not None:
        # A retryable failure, or a shard held by a lease that may belong to a dead worker.
        with session_scope(res.session_factory) as session:
            queue, priority = session.execute(
                select(Shard.queue, Job.priority).join(Job, Job.id == Shard.job_id).where(Shard.id == shard)
            ).one()
        publish_shard(self.app, shard, uuid.UUID(job_id), queue, priority, countdown=outcome.retry_in)
    if outcome.terminal:
        publish_finalize(self.app, uuid.UUID(job_id))
    return {"shard_id": shard_id, "job_id": job_id, "outcome": outcome.status, "error": outcome.error}
