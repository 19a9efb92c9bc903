"""The resources a worker process owns, attached to its Celery app and built on first use
(after any fork, so CUDA is initialised in the process that renders), and how a task waits out a
service outage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()


def worker_resources(app: Any):
    from farm.worker.runtime import WorkerResources

    with _lock:
        res = getattr(app, "farm_resources", None)
        if res is None:
            res = WorkerResources.create(app.farm_settings)
            app.farm_resources = res
        return res


def outlasting(res: Any, step: Callable[[], T], what: str) -> T:
    """``step()`` waited through service outages (``worker.service_wait_s``); past that the
    message goes back to its queue instead of being acknowledged as failed, so nothing is lost."""
    from celery.exceptions import Reject

    from farm.outages import ServiceUnavailable

    try:
        return res.outlast(step, what)
    except ServiceUnavailable as exc:
        raise Reject(str(exc), requeue=True) from exc
