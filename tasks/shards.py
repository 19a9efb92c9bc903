"""The render task: one shard per message, executed under a database lease."""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import shared_task
from sqlalchemy import select

from farm.dispatch import ShardLabel, publish_finalize, publish_shard
from farm.worker.runtime import ShardOutcome, execute_shard
from storage.db import session_scope
from storage.models import Job, Shard
from tasks.resources import outlasting, worker_resources


@shared_task(bind=True, name="farm.render_shard")
def render_shard(self, shard_id: str, job_id: str, sent_at: float | None = None) -> dict:
    res = worker_resources(self.app)
    shard, job = uuid.UUID(shard_id), uuid.UUID(job_id)
    # Each step waits out a restarting database, broker or store on its own, so a step that
    # already happened (the render) is not repeated because a later one (a publish) had to wait.
    outcome = outlasting(res, lambda: execute_shard(res, shard, sent_at), f"shard {shard_id}")
    if outcome.status == "rejected":
        # Blocked from this job: hand the shard back. Sent now, not with a countdown: a message
        # with an ETA is held by whichever worker receives it, and on Redis that kept being this
        # one; while this task runs this worker takes no other message (one at a time), so
        # another one receives it. The pause keeps a lone blocked worker from spinning.
        time.sleep(outcome.retry_in or 0.0)
        back = f"shard {shard_id}: hand back"
        outlasting(res, lambda: publish_shard(self.app, shard, job, **_route(res, shard)), back)
    elif outcome.retry_in is not None:
        # A retryable failure, a shard held by a lease that may belong to a dead worker, or a
        # worker blocked from the job handing the shard back for others.
        outlasting(
            res,
            lambda: publish_shard(self.app, shard, job, **_route(res, shard), countdown=outcome.retry_in),
            f"shard {shard_id}: requeue",
        )
    if outcome.terminal:
        outlasting(res, lambda: publish_finalize(self.app, job), f"job {job_id}: finalize")
    return _result(shard_id, job_id, outcome)


def _result(shard_id: str, job_id: str, outcome: ShardOutcome) -> dict[str, Any]:
    """The task's result, as Flower shows it: what happened, and for a finished shard how many
    items it rendered and where they are."""
    result: dict[str, Any] = {"outcome": outcome.status}
    if outcome.items_done is not None:
        result["items_done"] = f"{outcome.items_done}/{outcome.items}"
    if outcome.outputs is not None:
        result["outputs"] = outcome.outputs
    if outcome.shard_index is not None:
        result["shard"] = outcome.shard_index
    return {**result, "error": outcome.error, "job_id": job_id, "shard_id": shard_id}


def _route(res, shard: uuid.UUID) -> dict[str, Any]:
    """The shard's queue, its job's priority and its label for Flower."""
    with session_scope(res.session_factory) as session:
        row = session.execute(
            select(Shard.queue, Shard.index, Job.priority, Job.kind, Job.family)
            .join(Job, Job.id == Shard.job_id)
            .where(Shard.id == shard)
        ).one()
    return {"queue": row.queue, "priority": row.priority, "label": ShardLabel(row.index, row.kind, row.family)}
