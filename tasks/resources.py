"""The Celery glue every task shares: the resources a worker process owns, attached to its Celery
app and built on first use (after any fork, so CUDA is initialised in the process that renders),
and what becomes of a message whose work waited for a service longer than it may."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from farm.outages import ServiceUnavailable
from farm.worker.resources import WorkerResources

_lock = threading.Lock()


def worker_resources(app: Any):

    with _lock:
        res = getattr(app, "farm_resources", None)
        if res is None:
            res = WorkerResources.create(app.farm_settings)
            app.farm_resources = res
        return res


@contextlib.contextmanager
def requeue_on_outage() -> Iterator[None]:
    """The farm's steps wait through service outages (``worker.service_wait_s``); past that the
    message goes back to its queue instead of being acknowledged as failed, so nothing is lost."""
    from celery.exceptions import Reject

    try:
        yield
    except ServiceUnavailable as exc:
        raise Reject(str(exc), requeue=True) from exc
