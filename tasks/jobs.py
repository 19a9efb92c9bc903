"""Control tasks: split a job into shards, and finalize it when every shard is terminal."""

from __future__ import annotations

from celery import shared_task

from farm.dispatch import publish_shards
from farm.scheduler import finalize_job as finalize
from farm.scheduler import job_summary, parse_job_id
from farm.scheduler import schedule_job as schedule
from storage.db import session_scope
from storage.transitions import mark_shards_queued
from tasks.resources import worker_resources


@shared_task(bind=True, name="farm.schedule_job")
def schedule_job(self, job_id: str) -> dict:
    res = worker_resources(self.app)
    job = parse_job_id(job_id)
    with session_scope(res.session_factory) as session:
        dispatches = schedule(session, job)
    sent = publish_shards(self.app, dispatches)
    with session_scope(res.session_factory) as session:
        mark_shards_queued(session, sent)
    return {"job_id": job_id, "shards_sent": len(sent)}


@shared_task(bind=True, name="farm.finalize_job")
def finalize_job(self, job_id: str) -> dict:
    from farm.manifest import write_job_outputs

    res = worker_resources(self.app)
    job = parse_job_id(job_id)
    with session_scope(res.session_factory) as session:
        rollup, status = finalize(session, job)
        if rollup.all_terminal:
            write_job_outputs(session, res.store, job, job_summary(session, job))
    return {"job_id": job_id, "status": status.value, "all_terminal": rollup.all_terminal}
