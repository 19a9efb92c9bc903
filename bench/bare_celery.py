"""Bare Celery for ``bench.celery_overhead``: one no-op task on a plain Celery app.

The app carries the farm app's own Celery settings (JSON, late acks, prefetch 1, task events,
``task_track_started``, the broker's transport options and the result backend that
:func:`farm.celery_app.create_app` picks for that broker), copied from an app built from the same
``FARM_*`` settings, so the comparison isolates what the farm's code adds rather than Celery
configuration choices. Its only queue is :data:`QUEUE` (priorities enabled like the farm's GPU
queues). The task body appends its end time to a Redis list (``BENCH_COUNTER_URL``) so the bench
sees each task end (and the gaps between them), on either broker.

    python -m bench.bare_celery --name NAME [--loglevel L]   # a worker started like ``farm worker``
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

QUEUE = "bench.bare"
TASK = "bench.noop"
DONE_KEY = "bench:bare:done"  # a list: one end time per task run
MIRRORED = (
    "result_backend",
    "task_ignore_result",
    "task_serializer",
    "result_serializer",
    "event_serializer",
    "accept_content",
    "result_accept_content",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "task_acks_on_failure_or_timeout",
    "worker_prefetch_multiplier",
    "worker_pool",
    "worker_concurrency",
    "broker_heartbeat",
    "worker_send_task_events",
    "task_send_sent_event",
    "task_track_started",
    "task_queue_max_priority",
    "task_default_priority",
    "broker_transport_options",
    "broker_connection_retry_on_startup",
    "worker_hijack_root_logger",
    "enable_utc",
)

_counter: Any = None


def make_app(settings: Any) -> Any:
    """A plain Celery app with the farm app's settings for ``settings`` and the no-op task."""
    from celery import Celery
    from kombu import Queue

    from farm.celery_app import create_app

    farm_app = create_app(settings)
    app = Celery("bench-bare", broker=settings.broker.url, set_as_current=False)
    app.conf.update({key: farm_app.conf[key] for key in MIRRORED})
    app.conf.update(
        task_queues=[Queue(QUEUE, queue_arguments={"x-max-priority": 10})],
        task_default_queue=QUEUE,
    )
    farm_app.close()

    @app.task(name=TASK)
    def noop() -> None:
        global _counter
        if _counter is None:
            import redis

            _counter = redis.Redis.from_url(os.environ["BENCH_COUNTER_URL"])
        _counter.rpush(DONE_KEY, repr(time.time()))

    return app


def main(argv: list[str] | None = None) -> None:
    from farm.celery_app import worker_argv
    from farm.settings import load_settings

    parser = argparse.ArgumentParser(description="A bare Celery worker, as farm worker starts (bench.celery_overhead)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--loglevel", default="WARNING")
    args = parser.parse_args(argv)
    app = make_app(load_settings())
    app.worker_main(worker_argv([QUEUE], f"{args.name}@%h", args.loglevel))  # the flags `farm worker` passes


if __name__ == "__main__":
    main()
