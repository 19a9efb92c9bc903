"""The resources a worker process owns, attached to its Celery app and built on first use
(after any fork, so CUDA is initialised in the process that renders)."""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()


def worker_resources(app: Any):
    from farm.worker.runtime import WorkerResources

    with _lock:
        res = getattr(app, "farm_resources", None)
        if res is None:
            res = WorkerResources.create(app.farm_settings)
            app.farm_resources = res
        return res
