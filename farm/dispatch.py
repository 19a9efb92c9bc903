"""Publishing farm messages. Tasks are sent by name, so publishers (client, scheduler) never
import the task modules or anything heavy; arguments are named, plain JSON (ids as strings), so
Flower shows them as ``job_id``, ``shard_id``."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from farm.celery_app import CONTROL_QUEUE

if TYPE_CHECKING:
    from celery import Celery

    from farm.scheduler import ShardDispatch

SCHEDULE_JOB = "farm.schedule_job"
RENDER_SHARD = "farm.render_shard"
FINALIZE_JOB = "farm.finalize_job"


def publish_schedule(app: Celery, job_id: uuid.UUID) -> None:
    app.send_task(SCHEDULE_JOB, kwargs={"job_id": str(job_id)}, queue=CONTROL_QUEUE)


def publish_finalize(app: Celery, job_id: uuid.UUID) -> None:
    app.send_task(FINALIZE_JOB, kwargs={"job_id": str(job_id)}, queue=CONTROL_QUEUE)


def publish_shard(
    app: Celery, shard_id: uuid.UUID, job_id: uuid.UUID, queue: str, priority: int = 0, countdown: float | None = None
) -> None:
    app.send_task(
        RENDER_SHARD,
        kwargs={"shard_id": str(shard_id), "job_id": str(job_id), "sent_at": time.time()},
        queue=queue,
        priority=priority,
        countdown=countdown,
    )


def publish_shards(app: Celery, dispatches: Iterable[ShardDispatch]) -> list[uuid.UUID]:
    sent = []
    for d in dispatches:
        publish_shard(app, d.shard_id, d.job_id, d.queue, d.priority)
        sent.append(d.shard_id)
    return sent


SEND_CHUNK = 500  # shards published, then marked queued, per transaction


def send_shards(app: Celery, session_factory: Any, dispatches: Iterable[ShardDispatch], chunk: int = SEND_CHUNK) -> int:
    """Publish shard messages a chunk at a time, marking each chunk queued once it is on the
    broker: a publisher killed part-way leaves only the unsent shards PENDING (a restart re-sends
    at most one chunk twice). Returns how many were sent."""
    from storage.db import session_scope
    from storage.transitions import mark_shards_queued

    total = 0
    pending = iter(dispatches)
    while batch := list(itertools.islice(pending, chunk)):
        sent = publish_shards(app, batch)
        with session_scope(session_factory) as session:
            mark_shards_queued(session, sent)
        total += len(sent)
    return total
