"""Control tasks: split a job into shards, finalize it when every shard is terminal, feed bulk jobs."""

from __future__ import annotations

from celery import shared_task

from farm.dispatch import SCHEDULE_SLICE, publish_schedule, send_pending
from farm.feeder import feed
from farm.finalizer import finalize
from farm.scheduler import create_shards, parse_job_id
from storage.db import session_scope
from tasks.resources import outlasting, worker_resources


@shared_task(bind=True, name="farm.schedule_job")
def schedule_job(self, job_id: str) -> dict:
    """Split the job into shards and send them, at most ``SCHEDULE_SLICE`` per message: a larger
    job sends the rest from a new scheduling message, behind the control work queued meanwhile."""
    res = worker_resources(self.app)
    job = parse_job_id(job_id)

    def run() -> tuple[int, bool]:  # repeatable: a second run publishes the shards still pending
        with session_scope(res.session_factory) as session:
            running = create_shards(session, job)
        return send_pending(self.app, res.session_factory, job, limit=SCHEDULE_SLICE) if running else (0, False)

    sent, more = outlasting(res, run, f"job {job_id}: schedule")
    if more:
        outlasting(res, lambda: publish_schedule(self.app, job), f"job {job_id}: schedule the rest")
    return {"job_id": job_id, "shards_sent": sent, "more": more}


@shared_task(bind=True, name="farm.finalize_job")
def finalize_job(self, job_id: str) -> dict:
    res = worker_resources(self.app)
    job = parse_job_id(job_id)
    done = outlasting(res, lambda: finalize(res.session_factory, res.store, job), f"job {job_id}: finalize")
    window = res.settings.bulk.window_per_queue
    fed = outlasting(res, lambda: feed(self.app, res.session_factory, window), "bulk feed") if done.bulk else 0
    return {
        "job_id": job_id,
        "status": done.status.value,
        "all_terminal": done.rollup.all_terminal,
        "outputs_written": done.outputs_written,
        "fed": fed,
    }


@shared_task(bind=True, name="farm.feed_bulk")
def feed_bulk(self) -> dict:
    """Top the bulk windows up (``farm beat`` sends this every ``bulk.feed_interval_s``)."""
    res = worker_resources(self.app)
    window = res.settings.bulk.window_per_queue
    return {"fed": outlasting(res, lambda: feed(self.app, res.session_factory, window), "bulk feed")}


@shared_task(bind=True, name="farm.start_bulk")
def start_bulk(self, name: str) -> dict:
    """Start (or resume) the nightly bulk render ``name`` from ``bulk.schedules``."""
    from farm.beat import start_scheduled_bulk

    res = worker_resources(self.app)
    return start_scheduled_bulk(self.app, res, name)
