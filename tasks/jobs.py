"""Control tasks: split a job into shards, finalize it when every shard is terminal, feed bulk jobs,
package nightly bulk renders."""

from __future__ import annotations

from celery import shared_task

from farm.beat import package_scheduled_bulk, start_scheduled_bulk
from farm.feeder import feed_windows, schedule
from farm.finalizer import finalize_and_feed
from farm.scheduler import parse_job_id
from tasks.resources import requeue_on_outage, worker_resources


@shared_task(bind=True, name="farm.schedule_job")
def schedule_job(self, job_id: str) -> dict:
    """Split the job into shards and top its queue's window up (:func:`farm.feeder.schedule`)."""
    job = parse_job_id(job_id)
    res = worker_resources(self.app)
    with requeue_on_outage():
        return schedule(self.app, res, job)


@shared_task(bind=True, name="farm.finalize_job")
def finalize_job(self, job_id: str) -> dict:
    """Finalize the job, then feed the bulk windows (:func:`farm.finalizer.finalize_and_feed`)."""
    job = parse_job_id(job_id)
    res = worker_resources(self.app)
    with requeue_on_outage():
        return finalize_and_feed(self.app, res, job)


@shared_task(bind=True, name="farm.feed_bulk")
def feed_bulk(self) -> dict:
    """Top every queue's window up (``farm beat`` sends this every ``scheduling.feed_interval_s``)."""
    res = worker_resources(self.app)
    with requeue_on_outage():
        return feed_windows(self.app, res)


@shared_task(bind=True, name="farm.start_bulk")
def start_bulk(self, name: str) -> dict:
    """Start (or resume) the nightly bulk render ``name`` from ``bulk.schedules``."""
    res = worker_resources(self.app)
    return start_scheduled_bulk(self.app, res, name)


@shared_task(bind=True, name="farm.package_bulk")
def package_bulk(self, name: str) -> dict:
    """Extend the dataset packages of the nightly bulk render ``name`` (at its ``window_end``)."""
    res = worker_resources(self.app)
    with requeue_on_outage():
        return package_scheduled_bulk(res, name)
