"""Ending a job: its final status first, then its manifest and contact sheet, each on its own.

:func:`finalize` rolls the shards up and commits the job's final status before any object is
written, so a store that refuses writes (full, read-only, restarting) can never hold a finished
job in ``running``. :func:`write_outputs` then writes the manifest and the contact sheet once per
job end (``job.outputs_written_at``): late or duplicate finalize messages find them written and
do nothing, and a write the store refused is left for the reconciler to try again with backoff.
:func:`finalize_and_feed` is what a finalize message does: finalize, then top the bulk windows up
when the job feeds from a bulk job.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from farm.errors import StorageError
from farm.feeder import top_up
from farm.manifest import write_job_outputs
from farm.scheduler import finalize_job, job_summary
from storage.db import session_scope
from storage.dependencies import cancel_broken_dependents
from storage.models import Job, utcnow
from storage.objects import ObjectStore
from storage.recovery import unfinished_shard
from storage.status import JOB_ENDED_BADLY, JOB_TERMINAL, JobStatus
from storage.transitions import JobRollup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finalized:
    """What one finalize did: the roll-up, the job's status, whether it feeds from a bulk job,
    and whether this call wrote the outputs (``None``: the store refused, to be tried again)."""

    rollup: JobRollup
    status: JobStatus
    bulk: bool
    outputs_written: bool | None


def finalize(session_factory: Any, store: ObjectStore, job_id: uuid.UUID) -> Finalized:
    """Roll the job up (its final status once every shard has ended), commit, then write its
    outputs if they are due; a job that ended partial, failed or cancelled then cancels the jobs
    that wait for it under the ``cancel`` policy (:func:`cancel_dependents`). Safe to repeat."""
    done = _finalize_one(session_factory, store, job_id)
    if done.status in JOB_ENDED_BADLY:
        cancel_dependents(session_factory, store, [job_id])
    return done


def cancel_dependents(session_factory: Any, store: ObjectStore, upstream_ids: list[uuid.UUID] | None = None) -> int:
    """Cancel the jobs whose ``cancel``-policy upstream (one of ``upstream_ids``; ``None``: any)
    ended badly, and theirs in turn, each finalized (outputs written) as it is cancelled; the
    reconciler runs it every pass, so a lost finalize never leaves one waiting. Returns how many."""
    cancelled = 0
    while True:
        with session_scope(session_factory) as session:
            ids = cancel_broken_dependents(session, upstream_ids=upstream_ids)
        for dependent in ids:
            log.info("job %s cancelled: an upstream job ended badly (after_policy: cancel)", dependent)
            _finalize_one(session_factory, store, dependent)
        cancelled += len(ids)
        if not ids:
            return cancelled
        upstream_ids = ids


def _finalize_one(session_factory: Any, store: ObjectStore, job_id: uuid.UUID) -> Finalized:
    with session_scope(session_factory) as session:
        rollup, status = finalize_job(session, job_id)
        bulk = session.scalar(select(Job.bulk_id).where(Job.id == job_id)) is not None
    written: bool | None = False
    if rollup.all_terminal and status in JOB_TERMINAL:
        try:
            written = write_outputs(session_factory, store, job_id)
        except StorageError as exc:
            log.warning("job %s: manifest and contact sheet not written yet (the reconciler retries): %s", job_id, exc)
            written = None
    return Finalized(rollup, status, bulk, written)


def write_outputs(session_factory: Any, store: ObjectStore, job_id: uuid.UUID) -> bool:
    """Write the manifest and contact sheet of a terminal job whose shards have all ended and
    whose outputs are not written yet; True when this call wrote them. The job row stays locked
    while writing (another writer skips it). Raises :class:`StorageError` when the store refuses."""
    with session_scope(session_factory) as session:
        row = session.execute(
            select(Job.status, Job.outputs_written_at).where(Job.id == job_id).with_for_update(skip_locked=True)
        ).one_or_none()
        if row is None or JobStatus(row.status) not in JOB_TERMINAL or row.outputs_written_at is not None:
            return False
        if session.scalar(select(unfinished_shard(job_id))):
            return False  # a cancelled job's running shards stop at their next step
        write_job_outputs(session, store, job_id, job_summary(session, job_id))
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(outputs_written_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return True


def finalize_and_feed(app: Any, res: Any, job_id: uuid.UUID) -> dict[str, Any]:
    """What ``farm.finalize_job`` does: :func:`finalize` the job, then top every queue's window
    up (an ended job may have freed places, or released the jobs that wait for it; a lost feed
    after a shard's end is made up here).
    Each step waits out service outages on its own (``res.outlast``). Returns the task's result."""
    done = res.outlast(lambda: finalize(res.session_factory, res.store, job_id), f"job {job_id}: finalize")
    fed = top_up(app, res)  # every work queue: the jobs waiting for this one are released there too
    return {
        "job_id": str(job_id),
        "status": done.status.value,
        "all_terminal": done.rollup.all_terminal,
        "outputs_written": done.outputs_written,
        "fed": fed,
    }
