"""A worker process in the registry: registered at start, heartbeating while it lives, stopped at a
clean exit.

:class:`WorkerHeartbeat` runs one daemon thread per worker process. Each beat records the worker's
current shard and pinned models and sweeps the registry for workers silent past
``worker.lost_after_s`` (marking them lost and expiring their leases), so a dead worker is noticed
by any live one. A failed beat (database restarting) is logged and retried on the next one. While
the worker drains (``res.draining``, :mod:`farm.worker.drain`) its beats keep the row draining.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

from farm.families import CPU_QUEUE, GPU_QUEUE_PREFIX
from farm.periodic import PeriodicThread
from farm.worker.devices import device_info
from storage.db import session_scope
from storage.registry import register_worker, stop_worker, sweep_lost_workers, worker_heartbeat

log = logging.getLogger(__name__)


def _pinned(res: Any) -> list[str]:
    cache = res.cache  # never build the cache (and import torch) just to report it
    return [f"{family}:{model}" for model, family in cache.resident()] if cache is not None else []


class WorkerHeartbeat:
    """Registers ``res`` (a :class:`~farm.worker.runtime.WorkerResources`) for ``queues`` and
    keeps its row fresh. Use as a context manager around the worker's main loop."""

    def __init__(self, res: Any, queues: Sequence[str]) -> None:
        self.res = res
        self.queues = list(queues)
        settings = res.settings.worker
        self.interval = max(0.2, min(settings.heartbeat_seconds, settings.lost_after_s / 3))
        # A failed beat (the database restarting) is logged and tried again on the next one.
        self._thread = PeriodicThread("farm-heartbeat", self.interval, self.beat, "worker heartbeat")

    def _device(self) -> dict[str, Any]:
        if not any(q.startswith(GPU_QUEUE_PREFIX) for q in self.queues):
            # A control-only worker renders nothing; a farm.cpu worker runs steps on the CPU. Neither
            # loads a model (nor imports torch) to say so.
            return {"device": "cpu" if CPU_QUEUE in self.queues else "none"}

        return device_info(self.res.model_cache().placement)

    def register(self) -> None:
        with session_scope(self.res.session_factory) as session:
            register_worker(
                session,
                name=self.res.name,
                hostname=socket.gethostname(),
                queues=self.queues,
                pinned_models=_pinned(self.res),
                **self._device(),
            )

    def beat(self) -> None:
        """One heartbeat and one sweep for lost workers."""
        draining = self.res.draining.is_set()
        with session_scope(self.res.session_factory) as session:
            known = worker_heartbeat(
                session,
                self.res.name,
                current_shard_id=self.res.current_shard,
                pinned_models=_pinned(self.res),
                draining=draining,
            )
            lost = sweep_lost_workers(session, self.res.settings.worker.lost_after_s)
        if not known and not draining:
            self.register()  # the row was removed or marked stopped: register again
        if lost:
            log.warning("workers silent past %ss, marked lost: %s", self.res.settings.worker.lost_after_s, lost)

    def start(self) -> WorkerHeartbeat:
        self.register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop(timeout=10)
        try:
            with session_scope(self.res.session_factory) as session:
                stop_worker(session, self.res.name)
        except Exception as exc:
            log.warning("could not mark worker %s stopped: %s", self.res.name, exc)

    def __enter__(self) -> WorkerHeartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
