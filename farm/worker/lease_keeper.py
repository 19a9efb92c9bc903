"""Keeps a shard's lease alive while it renders, and carries progress, outputs and stop signals.

A background thread wakes every ``interval`` seconds. In one transaction of its own it writes what
changed since its last write: the latest progress, and the artifact rows of outputs uploaded
meanwhile (:meth:`LeaseKeeper.add_artifact`), together with a fenced lease renewal; with nothing
new it renews only every ``renew_every`` seconds. So progress and artifact rows cost at most one
write per interval, and a shard that ends within one interval writes none: its remaining rows go
in with the shard's end (:meth:`LeaseKeeper.take_artifacts`). The thread also watches the job:
when the job is cancelled, or the lease is lost to another attempt, the renderer's next step
callback raises and the render stops; when the feeder asks the shard to make way for interactive
work (``shard.preempt_requested_at``), the shard hands back after its current item.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import select

from farm.errors import FarmError, LeaseLost
from storage.db import session_scope
from storage.leases import ShardLease, add_artifacts, renew_lease
from storage.models import Job, Shard
from storage.status import JobStatus

log = logging.getLogger(__name__)


class ShardCancelled(FarmError):
    """The job was cancelled while the shard was rendering."""


class LeaseKeeper:
    def __init__(
        self,
        session_factory: Any,
        lease: ShardLease,
        lease_seconds: float,
        interval: float,
        renew_every: float | None = None,
    ) -> None:
        self._factory = session_factory
        self.lease = lease
        self._lease_seconds = lease_seconds
        self._interval = max(0.05, interval)
        self._renew_every = max(self._interval, renew_every if renew_every is not None else self._interval)
        self._renewed_at = time.monotonic()  # the claim set the lease
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[int, float] | None = None
        self._written: tuple[int, float] | None = None
        self._artifacts: list[dict[str, Any]] = []
        self.unsure = False  # the last write failed: it may have landed all the same
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self.preempted = threading.Event()  # the feeder asked the shard to hand back between items
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

    def add_artifact(self, row: dict[str, Any]) -> None:
        """An output uploaded by this attempt: its artifact row goes in with the next write."""
        with self._lock:
            self._artifacts.append(row)

    def take_artifacts(self) -> list[dict[str, Any]]:
        """The rows not written yet, for the transaction that ends the attempt (after the thread
        stopped); :attr:`unsure` says whether some may have landed by a write that failed."""
        with self._lock:
            rows, self._artifacts = self._artifacts, []
        return rows

    def check(self) -> None:
        """Raise when rendering must stop (called from the step callback)."""
        if self.lost.is_set():
            raise LeaseLost(f"shard {self.lease.shard_id}: lease lost during rendering")
        if self.cancelled.is_set():
            raise ShardCancelled(f"job {self.lease.job_id} was cancelled")

    def beat(self) -> None:
        """One wake-up: write what changed (progress, artifact rows) with a lease renewal, or
        renew when ``renew_every`` has passed; then look at the job's status."""
        with self._lock:
            progress, rows = self._progress, self._artifacts
            self._artifacts = []
        due = bool(rows) or progress != self._written or time.monotonic() - self._renewed_at >= self._renew_every
        try:
            with session_scope(self._factory) as session:
                if due:
                    kwargs = {"items_done": progress[0], "progress": progress[1]} if progress else {}
                    self.lease = renew_lease(session, self.lease, self._lease_seconds, **kwargs)
                    add_artifacts(session, self.lease, rows, maybe_written=self.unsure)
                status, preempt = session.execute(
                    select(Job.status, Shard.preempt_requested_at)
                    .join(Shard, Shard.job_id == Job.id)
                    .where(Shard.id == self.lease.shard_id)
                ).one()
        except BaseException:
            with self._lock:
                self._artifacts = rows + self._artifacts
            self.unsure = True
            raise
        self.unsure = False
        if due:
            self._renewed_at, self._written = time.monotonic(), progress
        if status == JobStatus.CANCELLED:
            self.cancelled.set()
        if preempt is not None:
            self.preempted.set()

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
