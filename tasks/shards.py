"""The render task: one shard per message (:func:`farm.shard_delivery.deliver_shard`)."""

from __future__ import annotations

import uuid

from celery import shared_task

from farm.shard_delivery import deliver_shard
from tasks.resources import requeue_on_outage, worker_resources


@shared_task(bind=True, name="farm.render_shard")
def render_shard(self, shard_id: str, job_id: str, sent_at: float | None = None) -> dict:
    shard, job = uuid.UUID(shard_id), uuid.UUID(job_id)
    res = worker_resources(self.app)
    with requeue_on_outage():
        return deliver_shard(self.app, res, shard, job, sent_at)
