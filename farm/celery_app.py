"""The farm's Celery application: built from settings by :func:`create_app`.

``celery -A farm.celery_app ...`` (and Flower) find ``app`` here; it is built from the environment
on first access (PEP 562 module ``__getattr__``), never at import time. The farm's own entry
points call :func:`create_app` with the settings they already hold.

Messages are JSON only. Tasks are acknowledged late and rejected when the worker dies, a worker
prefetches one message at a time, and task events are on for Flower. Job and shard state lives
in our own tables, so no result backend is needed.

A worker runs one task at a time on one pool thread (``threads`` pool, concurrency 1), never on
the thread of its consumer loop: that loop must stay free while a shard renders, because it
sends the worker heartbeats and task events Flower shows, answers control commands, keeps the
AMQP heartbeats, and sends the late acknowledgements. With the ``solo`` pool the task ran inside
that loop: Flower saw the worker offline and its shard PENDING for the whole render, RabbitMQ
dropped the connection of a render longer than two heartbeats, and an acknowledgement queued from
inside the loop waited for the loop's next timer (up to 2 s between tasks on RabbitMQ).

A worker process's :class:`~farm.worker.runtime.WorkerResources` (``app.farm_resources``) is
closed on Celery's ``worker_shutdown`` signal, sent at a warm shutdown (SIGTERM, Ctrl+C, a remote
shutdown) once the running task has finished; ``farm worker`` also closes them when its worker
loop returns (a cold shutdown sends no signal). The ``threads`` pool runs tasks in the worker
process itself, so there is no ``worker_process_shutdown`` (a prefork child's) to handle.

``farm worker`` drains on SIGTERM instead of waiting for the whole shard (:mod:`farm.worker.drain`):
on ``worker_ready``, once Celery has installed its signal handlers, the app's ``farm_drain`` takes
SIGTERM and SIGINT over; it still ends in Celery's warm shutdown, and a second signal stops the
worker at once (Celery's cold shutdown cannot stop a render on the ``threads`` pool).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu import Queue

from farm.settings import FarmSettings, load_settings
from farm.sharding import QUEUES, WORK_QUEUES

CONTROL_QUEUE = "farm.control"
GPU_QUEUES = tuple(QUEUES.values())
TASK_MODULES = ("tasks.jobs", "tasks.shards")
MAX_PRIORITY = 9
WORKER_POOL, WORKER_CONCURRENCY = "threads", 1  # one render at a time, off the consumer loop's thread


def broker_options(settings: FarmSettings) -> dict[str, Any]:
    """Transport options for the configured broker (folders, visibility timeout, priorities)."""
    url = settings.broker.url
    if url.startswith("filesystem://"):
        folder: Path = settings.broker_folder
        return {
            "data_folder_in": str(folder / "messages"),
            "data_folder_out": str(folder / "messages"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # kombu looks at an empty folder once a second by default: every job's scheduling
            # message waited up to 1 s (bench.farm_vs_diffusers, embedded). A listing is cheap.
            "polling_interval": 0.1,
        }
    if url.startswith(("redis://", "rediss://")):
        vt = settings.broker.visibility_timeout
        return {
            "visibility_timeout": vt,
            # kombu sweeps for messages of dead workers every interval x throttle seconds
            # (100 s by default); sweep at a quarter of the visibility timeout, at most every 10 s.
            "unacked_restore_interval": max(1, min(10, vt // 4)),
            "unacked_restore_throttle": 1,
            "priority_steps": list(range(MAX_PRIORITY + 1)),
            "sep": ":",
            "queue_order_strategy": "priority",
        }
    return {}


def create_app(settings: FarmSettings, *, name: str = "farm") -> Celery:
    """A Celery app for these settings. Each call returns a new, independent app."""
    options = broker_options(settings)
    if settings.broker.url.startswith("filesystem://"):
        for key in ("data_folder_in", "control_folder"):
            Path(options[key]).mkdir(parents=True, exist_ok=True)
    app = Celery(name, broker=settings.broker.url, include=list(TASK_MODULES), set_as_current=False)
    app.conf.update(
        result_backend=settings.broker.result_backend,
        task_ignore_result=settings.broker.result_backend is None,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_pool=WORKER_POOL,
        worker_concurrency=WORKER_CONCURRENCY,
        broker_heartbeat=settings.broker.heartbeat_s,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue=CONTROL_QUEUE,
        task_queues=[Queue(CONTROL_QUEUE), *(Queue(q, queue_arguments={"x-max-priority": 10}) for q in WORK_QUEUES)],
        task_queue_max_priority=10,
        task_default_priority=0,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    app.farm_settings = settings  # type: ignore[attr-defined]
    return app


def worker_argv(queues: list[str], hostname: str, loglevel: str) -> list[str]:
    """The ``worker`` command line ``farm worker`` runs (the bench's bare Celery worker runs it too)."""
    return [
        "worker",
        "--queues",
        ",".join(queues),
        "--pool",
        WORKER_POOL,
        "--concurrency",
        str(WORKER_CONCURRENCY),
        "--hostname",
        hostname,
        "--loglevel",
        loglevel,
        "--task-events",
        "--without-gossip",
        "--without-mingle",
    ]


@signals.worker_shutdown.connect(dispatch_uid="farm.close_worker_resources")
def close_worker_resources(sender: Any = None, **_: Any) -> None:
    """Celery's worker is stopping: release what its process holds (see the module docstring).
    ``sender`` is the WorkController; closing twice is harmless."""
    resources = getattr(getattr(sender, "app", None), "farm_resources", None)
    if resources is not None:
        resources.close()


@signals.worker_ready.connect(dispatch_uid="farm.install_worker_drain")
def install_worker_drain(sender: Any = None, **_: Any) -> None:
    """Celery's worker is ready, its signal handlers installed (``sender`` is its consumer, on the
    main thread): the app's drain (``farm worker`` sets ``app.farm_drain``) takes SIGTERM over."""
    drain = getattr(getattr(sender, "app", None), "farm_drain", None)
    controller = getattr(sender, "controller", None)
    if drain is not None and controller is not None:
        drain.install(controller)


def __getattr__(name: str) -> Celery:
    # `celery -A farm.celery_app` and Flower look up `app` (or `celery`): build it on first access.
    if name in {"app", "celery"}:
        app = create_app(load_settings())
        globals()[name] = app
        return app
    raise AttributeError(name)
