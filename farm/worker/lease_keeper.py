"""Keeps a shard's lease alive while it renders, and carries progress and stop signals.

A background thread renews the lease every ``interval`` seconds in its own session, writing the
latest progress with it (so progress costs at most one write per interval). It also watches the
job: when the job is cancelled, or the lease is lost to another attempt, the renderer's next step
callback raises and the render stops.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import select

from farm.errors import FarmError, LeaseLost
from storage.db import session_scope
from storage.leases import ShardLease, renew_lease
from storage.models import Job
from storage.status import JobStatus

log = logging.getLogger(__name__)


class ShardCancelled(FarmError):
    """The job was cancelled while the shard was rendering."""


class LeaseKeeper:
    def __init__(self, session_factory: Any, lease: ShardLease, lease_seconds: float, interval: float) -> None:
        self._factory = session_factory
        self.lease = lease
        self._lease_seconds = lease_seconds
        self._interval = max(0.05, interval)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[int, float] | None = None
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.shard_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def report(self, items_done: int, progress: float) -> None:
        with self._lock:
            self._progress = (items_done, progress)

    def check(self) -> None:
        """Raise when rendering must stop (called from the step callback)."""
        if self.lost.is_set():
            raise LeaseLost(f"shard {self.lease.shard_id}: lease lost during rendering")
        if self.cancelled.is_set():
            raise ShardCancelled(f"job {self.lease.job_id} was cancelled")

    def beat(self) -> None:
        """Renew once now (also used before the first item)."""
        with self._lock:
            progress = self._progress
        with session_scope(self._factory) as session:
            kwargs = {"items_done": progress[0], "progress": progress[1]} if progress else {}
            self.lease = renew_lease(session, self.lease, self._lease_seconds, **kwargs)
            status = session.scalar(select(Job.status).where(Job.id == self.lease.job_id))
        if status == JobStatus.CANCELLED:
            self.cancelled.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self._interval):
            try:
                self.beat()
                if failures:
                    log.info("shard %s: lease renewed again after %d failed tries", self.lease.shard_id, failures)
                failures = 0
            except LeaseLost:
                self.lost.set()
                return
            except Exception as exc:
                # A database outage: keep trying for as long as the render goes on. The lease may
                # expire meanwhile; it stays ours unless another attempt took it over, which the
                # next renewal (or the next artifact row) learns as LeaseLost. Giving up here would
                # stop a render that the outage's end lets finish.
                failures += 1
                if failures == 1:
                    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    log.warning("shard %s: lease renewal failed, trying again: %s", self.lease.shard_id, first_line)
