"""The reconciler: the database is the truth, messages are hints.

Any message can be lost: a broker restarted empty, a worker that dies holding one, a fenced
attempt that acknowledges its delivery, a finalize that the store refused. A pass derives from
the tables alone what must happen and does it, idempotently:

1. **pending jobs** older than ``reconcile.stuck_after_s`` (their scheduling message was lost, or
   the broker was down at submit) are scheduled here;
2. **orphaned shards** (RUNNING, lease expired: the worker died, froze, or gave up) are sent again
   for a take-over, unless their holder is alive and rendering them (a worker that waited out a
   database outage renews its own lease). A shard whose lease expired on its ``max_attempts``-th
   attempt is failed for good: its worker process died every time (a crash loop);
3. **waiting shards** (QUEUED: sent, never taken) are sent again when every live
   worker on their queue has been idle for ``stuck_after_s`` while they waited as long: their
   messages are gone. A queue whose workers are busy is moving; one without live workers has
   nobody to send to (``farm status`` says so), so neither is touched;
4. **ended jobs** (RUNNING, every shard terminal) are finalized;
5. **outputs** (manifest, contact sheet) of terminal jobs that lack them are written, retried with
   backoff while the store refuses;
6. **dependents** of upstream jobs that ended badly are cancelled where their ``after_policy`` is
   ``cancel`` (:func:`farm.finalizer.cancel_dependents`): a lost finalize never leaves one waiting;
7. **windows** are topped up (:mod:`farm.feeder`), which also releases the shards whose upstream
   work has succeeded since (:mod:`storage.dependencies`).

Every change is a guarded update that re-checks its condition under the row lock
(:mod:`storage.recovery`, :mod:`storage.transitions`), so passes may run in several processes
at once (every control worker and ``farm beat`` run one) without acting twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select

from farm.dispatch import class_priority, publish_shard, shard_labels
from farm.errors import FarmError, StorageError
from farm.feeder import feed
from farm.finalizer import cancel_dependents, finalize, write_outputs
from farm.outages import unavailable_service
from farm.periodic import PeriodicThread
from farm.scheduler import create_shards
from farm.settings import FarmSettings
from farm.sharding import WORK_QUEUES
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job, Shard, utcnow
from storage.objects import open_store
from storage.recovery import Orphan, fail_crash_loop, orphaned_shards, take_orphaned, take_waiting, unfinished_shard
from storage.registry import Consumer, queue_consumers
from storage.status import JOB_TERMINAL, JobStatus
from storage.transitions import set_job_status

log = logging.getLogger(__name__)

MAX_OUTPUT_BACKOFF_S = 600.0


@dataclass
class ReconcileReport:
    """What one pass did, counted by action."""

    scheduled: int = 0  # pending jobs scheduled (their message was lost)
    scheduling_failed: int = 0  # pending jobs whose spec could not be split: failed with the reason
    resent_orphaned: int = 0  # running shards with an expired lease, sent again to be taken over
    crash_loops: int = 0  # shards failed for good: their worker died on every attempt
    resent_waiting: int = 0  # waiting shards whose message was lost, sent again
    finalized: int = 0  # jobs whose shards had all ended, given their final status
    outputs_written: int = 0  # manifests and contact sheets written
    outputs_failed: int = 0  # manifest writes the store refused (tried again later)
    dependents_cancelled: int = 0  # jobs cancelled: a cancel-policy upstream ended badly
    fed: int = 0  # shards sent to fill the windows
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    ACTIONS = (
        "scheduled",
        "scheduling_failed",
        "resent_orphaned",
        "crash_loops",
        "resent_waiting",
        "finalized",
        "outputs_written",
        "outputs_failed",
        "dependents_cancelled",
        "fed",
    )

    @property
    def acted(self) -> bool:
        return any(getattr(self, name) for name in self.ACTIONS) or bool(self.errors)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        counts = {name.replace("_", " "): getattr(self, name) for name in self.ACTIONS}
        done = ", ".join(f"{name} {n}" for name, n in counts.items() if n)
        return (done or "nothing to do") + (f"; errors: {'; '.join(self.errors)}" if self.errors else "")


class Reconciler:
    """One farm's reconciler: its settings, database, broker app and store."""

    def __init__(self, settings: FarmSettings, session_factory: Any, app: Any, store: Any, metrics: Any = None) -> None:
        self.settings, self.sessions, self.app, self.store = settings, session_factory, app, store
        self.metrics = metrics
        self._output_backoff: dict[uuid.UUID, tuple[float, float]] = {}  # job -> (next try, delay)

    @classmethod
    def for_settings(cls, settings: FarmSettings, app: Any, metrics: Any = None) -> Reconciler:
        """A reconciler with its own database engine and store (``farm beat``, ``farm reconcile``)."""

        engine = make_engine(settings.database_url, pool_size=settings.db.pool_size)
        store = open_store(settings.storage, settings.data_dir)
        return cls(settings, make_session_factory(engine), app, store, metrics)

    # -- a pass ---------------------------------------------------------------------------------
    def run_pass(self, now: datetime | None = None) -> ReconcileReport:
        """One pass over every step. A step that fails is reported and the next one runs; a
        database outage ends the pass (every step needs the database)."""
        started = time.perf_counter()
        now = now or utcnow()
        report = ReconcileReport()
        for step in (
            self._schedule_pending,
            self._resend_orphaned,
            self._resend_waiting,
            self._finalize_ended,
            self._write_missing_outputs,
            self._cancel_dependents,
            self._feed,
        ):
            try:
                step(now, report)
            except Exception as exc:
                service = unavailable_service(exc)
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                report.errors.append(f"{step.__name__.strip('_')}: {first_line}")
                if service == "database":
                    break
                if service is None:
                    log.exception("reconciler step %s failed", step.__name__)
        report.seconds = round(time.perf_counter() - started, 4)
        if self.metrics is not None:
            self.metrics.observe_reconcile(report)
        if report.acted:
            log.info("reconciler: %s (%.2fs)", report.describe(), report.seconds)
        return report

    @property
    def _stuck_after(self) -> timedelta:
        return timedelta(seconds=self.settings.reconcile.stuck_after_s)

    # -- 1. pending jobs ----------------------------------------------------------------------------
    def _schedule_pending(self, now: datetime, report: ReconcileReport) -> None:
        with session_scope(self.sessions) as session:
            ids = session.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.PENDING, Job.created_at < now - self._stuck_after)
                .order_by(Job.created_at)
                .limit(self.settings.reconcile.batch)
            ).all()
        for job_id in ids:
            try:
                with session_scope(self.sessions) as session:
                    locked = session.scalar(
                        select(Job.id)
                        .where(Job.id == job_id, Job.status == JobStatus.PENDING)
                        .with_for_update(skip_locked=True)
                    )
                    if locked is not None:
                        create_shards(session, job_id)  # the pass's last step feeds them
            except FarmError as exc:
                if exc.retryable:
                    raise
                self._fail_scheduling(job_id, str(exc), report)
                continue
            if locked is not None:
                report.scheduled += 1

    def _fail_scheduling(self, job_id: uuid.UUID, reason: str, report: ReconcileReport) -> None:
        with session_scope(self.sessions) as session:
            set_job_status(session, job_id, JobStatus.FAILED, expected=JobStatus.PENDING, error=f"scheduling: {reason}")
        log.warning("job %s could not be scheduled, failed: %s", job_id, reason)
        report.scheduling_failed += 1

    # -- 2. orphaned shards -------------------------------------------------------------------------
    def _resend_orphaned(self, now: datetime, report: ReconcileReport, job_id: uuid.UUID | None = None) -> None:
        lease_s = self.settings.worker.lease_seconds
        max_attempts = self.settings.worker.max_attempts
        resent_before = now - self._stuck_after if job_id is None else now
        resend: list[Orphan] = []
        ended: set[uuid.UUID] = set()
        with session_scope(self.sessions) as session:
            live = {c.name: c for cs in self._consumers(session, now).values() for c in cs}
            batch = self.settings.reconcile.batch
            for orphan in orphaned_shards(session, now, resent_before, batch, max_attempts=max_attempts, job_id=job_id):
                holder = live.get(orphan.owner or "")
                if (
                    holder is not None
                    and holder.current_shard_id == orphan.shard_id
                    and orphan.lease_expires_at > now - timedelta(seconds=lease_s)
                ):
                    continue  # alive and rendering it: its lease keeper renews once the database answers
                if orphan.attempts >= max_attempts:
                    error = fail_crash_loop(session, orphan.shard_id, max_attempts, now)
                    if error is not None:
                        log.warning("shard %s failed for good: %s", orphan.shard_id, error)
                        report.crash_loops += 1
                        ended.add(orphan.job_id)
                elif take_orphaned(session, orphan, resent_before, now):
                    resend.append(orphan)
            labels = shard_labels(session, [orphan.shard_id for orphan in resend])
        for orphan in resend:
            label = labels.get(orphan.shard_id)
            priority = class_priority(self.app, orphan.service_class)
            publish_shard(self.app, orphan.shard_id, orphan.job_id, orphan.queue, priority, label=label)
            report.resent_orphaned += 1
        for ended_job in ended:
            self._finalize(ended_job, report)

    # -- 3. waiting shards --------------------------------------------------------------------------
    def _resend_waiting(self, now: datetime, report: ReconcileReport, job_id: uuid.UUID | None = None) -> None:
        before = now - self._stuck_after if job_id is None else now
        with session_scope(self.sessions) as session:
            consumers = self._consumers(session, now)
        for queue in sorted({*WORK_QUEUES, *consumers}):
            workers = consumers.get(queue, [])
            if not workers:
                continue  # nobody would take a message: nothing was lost, nothing can be gained
            if job_id is None and not all(_idle_since(w, before) for w in workers):
                continue  # a worker rendered recently: the queue moves; lost messages show once it stops
            with session_scope(self.sessions) as session:
                resends = take_waiting(session, queue, before, self.settings.reconcile.batch, job_id=job_id, now=now)
                labels = shard_labels(session, [r.shard_id for r in resends])
            for r in resends:
                priority = class_priority(self.app, r.service_class)
                publish_shard(self.app, r.shard_id, r.job_id, r.queue, priority, label=labels.get(r.shard_id))
            report.resent_waiting += len(resends)

    # -- 4. ended jobs ------------------------------------------------------------------------------
    def _finalize_ended(self, now: datetime, report: ReconcileReport) -> None:
        unfinished = unfinished_shard(Job.id)
        any_shard = exists().where(Shard.job_id == Job.id)
        with session_scope(self.sessions) as session:
            ids = session.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.RUNNING, any_shard, ~unfinished)
                .order_by(Job.created_at)
                .limit(self.settings.reconcile.batch)
            ).all()
        for job_id in ids:
            self._finalize(job_id, report)

    def _finalize(self, job_id: uuid.UUID, report: ReconcileReport) -> None:
        done = finalize(self.sessions, self.store, job_id)
        report.finalized += int(done.status in JOB_TERMINAL)
        report.outputs_written += int(bool(done.outputs_written))
        if done.outputs_written is None:
            report.outputs_failed += 1
            self._back_off(job_id)

    # -- 5. outputs ---------------------------------------------------------------------------------
    def _write_missing_outputs(self, now: datetime, report: ReconcileReport) -> None:
        with session_scope(self.sessions) as session:
            ids = session.scalars(
                select(Job.id)
                .where(Job.status.in_(list(JOB_TERMINAL)), Job.outputs_written_at.is_(None))
                .order_by(Job.finished_at)
                .limit(self.settings.reconcile.batch)
            ).all()
        for job_id in ids:
            if time.monotonic() < self._output_backoff.get(job_id, (0.0, 0.0))[0]:
                continue
            try:
                written = write_outputs(self.sessions, self.store, job_id)
            except StorageError as exc:
                delay = self._back_off(job_id)
                report.outputs_failed += 1
                log.warning("job %s: outputs not written, next try in %.0fs: %s", job_id, delay, exc)
                continue
            self._output_backoff.pop(job_id, None)
            report.outputs_written += int(written)

    def _back_off(self, job_id: uuid.UUID) -> float:
        """Try the job's outputs again after a pass interval, doubling up to 10 minutes."""
        _, delay = self._output_backoff.get(job_id, (0.0, self.settings.reconcile.interval_s / 2))
        delay = min(MAX_OUTPUT_BACKOFF_S, delay * 2)
        self._output_backoff[job_id] = (time.monotonic() + delay, delay)
        return delay

    # -- 6. dependents of upstreams that ended badly -----------------------------------------------
    def _cancel_dependents(self, now: datetime, report: ReconcileReport) -> None:
        report.dependents_cancelled += cancel_dependents(self.sessions, self.store)

    # -- 7. windows ----------------------------------------------------------------------------
    def _feed(self, now: datetime, report: ReconcileReport) -> None:
        report.fed += feed(self.app, self.sessions, self.settings, now=now)

    # -- one job, on request (`farm retry`) -------------------------------------------------------
    def resend_job(self, job_id: uuid.UUID, now: datetime | None = None) -> ReconcileReport:
        """Send again every shard of one job that waits without a claim or holds an expired
        lease, at once (no waiting period); the rest of the pass is not run."""
        now = now or utcnow()
        report = ReconcileReport()
        self._resend_orphaned(now, report, job_id=job_id)
        self._resend_waiting(now, report, job_id=job_id)
        return report

    def _consumers(self, session: Any, now: datetime) -> dict[str, list[Consumer]]:
        return queue_consumers(session, self.settings.worker.lost_after_s, now)


def _idle_since(worker: Consumer, before: datetime) -> bool:
    return worker.current_shard_id is None and worker.idle_since is not None and worker.idle_since < before


class ReconcilerLoop:
    """Runs :meth:`Reconciler.run_pass` every ``reconcile.interval_s`` on a daemon thread (a
    worker's or ``farm beat``'s). A failed pass (a service restarting) is logged and the next one
    runs on time."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        interval = reconciler.settings.reconcile.interval_s
        self._thread = PeriodicThread("farm-reconciler", interval, reconciler.run_pass, "reconciler pass")

    def __enter__(self) -> ReconcilerLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()
