"""One delivery of a shard message (``farm.render_shard``): execute the shard, then send what its
outcome calls for, and say what happened in the task's result (Flower shows it).

:func:`deliver_shard` runs the shard (:func:`~farm.worker.runtime.execute_shard`);
:func:`follow_up` is the policy for what comes after:

- ``rejected`` (this worker is blocked from the job): pause, then send the shard again at once;
- any other outcome with ``retry_in`` (a retryable failure, a shard held by a live lease, a shard
  handed back between items): send it again with that countdown;
- ``preempted`` (handed back to make way for interactive work) and ``drained`` (handed back
  between items because this worker is stopping): nothing; it is PENDING again and the feeder
  sends it (this worker no longer counts towards the window). A delivery that reaches a worker
  already draining is ``drained`` unclaimed, with ``retry_in`` 0: sent again at once;
- a terminal outcome (``succeeded``, ``failed``, ``cancelled``): send the job's finalize message
  when the outcome asks for it (a shard that succeeded asks only when it ended the job or when
  the job's roll-up is due);
- after any attempt: charge its render time to the job's project and owner, and top the
  shard's queue's window up (:func:`farm.feeder.top_up`): the database picks what runs next;
  after a success also the queues of jobs that wait for this job shard by shard
  (:mod:`storage.dependencies`): its end may have released their shard of the same index.

Each step waits out a restarting database, broker or store on its own (``res.outlast``), so a
step that already happened (the render) is not repeated because a later one (a publish) had to
wait; past ``worker.service_wait_s`` it raises :class:`~farm.outages.ServiceUnavailable`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from farm.dispatch import publish_finalize, publish_shard, shard_route
from farm.feeder import top_up
from farm.worker.runtime import execute_shard
from storage.db import session_scope
from storage.dependencies import dependent_queues
from storage.status import DependencyMode

if TYPE_CHECKING:
    from celery import Celery

    from farm.worker.resources import WorkerResources
    from farm.worker.runtime import ShardOutcome


def deliver_shard(
    app: Celery, res: WorkerResources, shard_id: uuid.UUID, job_id: uuid.UUID, sent_at: float | None = None
) -> dict[str, Any]:
    """Execute the shard, act on its outcome (:func:`follow_up`) and return the task's result."""

    outcome = res.outlast(lambda: execute_shard(res, shard_id, sent_at, job_id), f"shard {shard_id}")
    follow_up(app, res, shard_id, job_id, outcome)
    return shard_result(str(shard_id), str(job_id), outcome)


def follow_up(
    app: Celery,
    res: Any,
    shard_id: uuid.UUID,
    job_id: uuid.UUID,
    outcome: ShardOutcome,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Send what ``outcome`` calls for: the shard again (handed back, or retried with a countdown)
    and, once the shard has ended, the job's finalize message. ``res`` needs ``session_factory``
    and ``outlast``."""
    if outcome.status == "rejected":
        # Blocked from this job: hand the shard back. Sent now, not with a countdown: a message
        # with an ETA is held by whichever worker receives it, and on Redis that kept being this
        # one; while this task runs this worker takes no other message (one at a time), so
        # another one receives it. The pause keeps a lone blocked worker from spinning.
        sleep(outcome.retry_in or 0.0)
        back = f"shard {shard_id}: hand back"
        res.outlast(lambda: publish_shard(app, shard_id, job_id, **_route(app, res, shard_id)), back)
    elif outcome.retry_in is not None:
        # A retryable failure, a shard held by a lease that may belong to a dead worker, a
        # shard that stopped between items and went back to the queue (``handed_back``), or a
        # delivery that reached a draining worker (``drained``, not claimed).
        res.outlast(
            lambda: publish_shard(app, shard_id, job_id, **_route(app, res, shard_id), countdown=outcome.retry_in),
            f"shard {shard_id}: requeue",
        )
    if outcome.queue is not None:
        queues = [outcome.queue]
        if outcome.status == "succeeded":  # it may release shards of jobs that wait for it shard by shard
            queues += res.outlast(lambda: _released_queues(res, job_id), f"job {job_id}: dependents")
        top_up(app, res, sorted(set(queues)), outcome.charge)
    if outcome.terminal and outcome.finalize:
        res.outlast(lambda: publish_finalize(app, job_id), f"job {job_id}: finalize")


def _released_queues(res: Any, job_id: uuid.UUID) -> list[str]:
    with session_scope(res.session_factory) as session:
        return dependent_queues(session, job_id, DependencyMode.SHARD)


def _route(app: Celery, res: Any, shard_id: uuid.UUID) -> dict[str, Any]:

    with session_scope(res.session_factory) as session:
        return shard_route(app, session, shard_id)


def shard_result(shard_id: str, job_id: str, outcome: ShardOutcome) -> dict[str, Any]:
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
