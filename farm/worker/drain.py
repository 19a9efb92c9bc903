"""Draining a worker on SIGTERM: it takes no new work, hands its shard back after the item in
progress, leaves the registry and exits 0 within ``worker.drain_timeout_s``.

Celery's own SIGTERM is a warm shutdown that waits for the running task: the whole shard, which
can take many minutes, longer than a scale-in or a rollout waits. :class:`WorkerDrain` takes
SIGTERM and SIGINT over once Celery has installed its handlers (``worker_ready``, see
:mod:`farm.celery_app`). The first signal:

1. sets ``res.draining``: the running shard hands back after the item in progress (PENDING again,
   its items kept, no attempt counted, outcome ``drained``:
   :meth:`~farm.worker.shard_run.ShardRun.hand_back_if_draining`), or finishes when it is on its
   last item; a delivery that starts now is sent again unclaimed, for another worker;
2. runs Celery's warm shutdown handler: the consumer is cancelled at once (no new message; a
   message held but not started goes back to the broker when the connection closes), the worker
   waits for the task, acknowledges it, closes its resources (``worker_shutdown``: the registry row
   says stopped) and exits 0;
3. wakes the drain thread, which marks the worker draining in the registry
   (:func:`storage.registry.mark_draining`): from then on it is no queue's consumer, so the
   feeder's windows, the reconciler and ``farm workers`` stop counting it, and ``farm-healthcheck
   worker`` says it is not ready.

A second SIGTERM or SIGINT stops the worker at once: the drain thread marks it stopped, expires
its leases (the shard in progress is taken over by its next delivery, or sent again by the
reconciler, with the attempt counted, as after a lost worker) and ends the process with exit
status :data:`EXIT_FORCED`; so it does when the drain outlasts ``worker.drain_timeout_s`` (an
item longer than the bound). Celery's own cold shutdown cannot do this with the ``threads`` pool:
it raises ``NotImplementedError`` (a thread cannot be killed), closes the resources under the
running render and exits 0. A third signal ends the process without a word (the database may be
away). SIGKILL leaves the lease to expire on its own, as it always did.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import platforms

from storage.db import session_scope
from storage.leases import expire_leases
from storage.registry import mark_draining, stop_worker

log = logging.getLogger(__name__)

EXIT_FORCED = 1  # the drain did not end in time, or a second signal asked to stop now
RECORD_WAIT_S = 5.0  # a forced stop waits this long at most for its registry write
DRAIN_SIGNALS = ("SIGTERM", "SIGINT")


class WorkerDrain:
    """The drain of one worker process (``res``: its :class:`~farm.worker.resources.WorkerResources`).
    ``exit`` ends the process when the drain is forced (``os._exit``: the render thread cannot be
    joined)."""

    def __init__(self, res: Any, timeout_s: float, *, exit: Callable[[int], Any] = os._exit) -> None:
        self.res = res
        self.timeout_s = timeout_s
        self._exit = exit
        self._wake = threading.Event()  # the first signal came
        self._now = threading.Event()  # a second one came
        self._thread = threading.Thread(target=self._watch, name="farm-drain", daemon=True)

    @property
    def requested(self) -> bool:
        return self._wake.is_set()

    def install(self, worker: Any) -> bool:
        """Take SIGTERM and SIGINT over from Celery's ``worker`` (its WorkController). Call it on
        the main thread once Celery has installed its own handlers; returns whether it did."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("worker %s: the drain on SIGTERM is not installed (not on the main thread)", self.res.name)
            return False
        warm = platforms.signals["SIGTERM"]  # Celery's warm shutdown
        if not callable(warm):
            log.warning("worker %s: Celery installed no SIGTERM handler; the drain is not installed", self.res.name)
            return False

        def on_signal(signum: int, frame: Any) -> None:
            # In a signal handler: set flags and hand over; the drain thread does the rest.
            if self._now.is_set():  # a third signal: the drain thread is stuck (the database?)
                self._exit(EXIT_FORCED)
            elif self._wake.is_set():  # a second signal: stop now
                self._now.set()
            else:
                self.res.draining.set()
                self._wake.set()
                warm(signum, frame)

        if not self._thread.is_alive():
            self._thread.start()
        for name in DRAIN_SIGNALS:
            platforms.signals[name] = on_signal
        return True

    def _watch(self) -> None:
        self._wake.wait()
        deadline = time.monotonic() + self.timeout_s
        shard = self.res.current_shard
        log.warning(
            "worker %s draining: takes no new shard; %s; it stops within %g s (worker.drain_timeout_s)",
            self.res.name,
            f"shard {shard} hands back after the item in progress" if shard else "no shard in progress",
            self.timeout_s,
        )
        self._record("mark it draining", lambda session: mark_draining(session, self.res.name))
        if self._now.wait(max(0.0, deadline - time.monotonic())):
            self._force("a second signal asked to stop now")
        else:
            self._force(f"the drain outlasted worker.drain_timeout_s ({self.timeout_s:g} s)")

    def _force(self, why: str) -> None:
        """End the process now: the worker stopped in the registry and its leases expired, so the
        shard in progress is taken over by its next delivery."""
        shard = self.res.current_shard
        log.error(
            "worker %s: %s; stopping now%s (exit status %d)",
            self.res.name,
            why,
            f" with shard {shard} unfinished: its lease is expired for another worker to take over" if shard else "",
            EXIT_FORCED,
        )

        def stop(session: Any) -> None:
            expire_leases(session, [self.res.name])
            stop_worker(session, self.res.name)

        self._record("mark it stopped", stop).join(RECORD_WAIT_S)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(EXIT_FORCED)

    def _record(self, what: str, change: Callable[[Any], Any]) -> threading.Thread:
        """Write ``change`` to the registry on a thread of its own (a database that does not answer
        must not hold the drain's clock up); returns the thread."""

        def write() -> None:
            try:
                with session_scope(self.res.session_factory) as session:
                    change(session)
            except Exception as exc:  # the heartbeat (or the lease's expiry) tells the rest
                log.warning("worker %s: could not %s in the registry: %s", self.res.name, what, exc)

        thread = threading.Thread(target=write, name=f"farm-drain-{what.split()[-1]}", daemon=True)
        thread.start()
        return thread
