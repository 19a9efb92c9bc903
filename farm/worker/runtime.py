"""Running one shard: claim, render each item, upload, record, finish.

:func:`execute_shard` is what :func:`farm.shard_delivery.deliver_shard` (the ``render_shard``
task) calls, with the worker's :class:`~farm.worker.resources.WorkerResources`.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from farm.errors import FarmError, LeaseLost, UserError, describe_error
from farm.fair_share import Charge
from farm.kinds import job_kind
from farm.settings import FarmSettings
from farm.specs import JobSpec, parse_spec
from farm.worker.job_patches import apply_job_patches
from farm.worker.lease_keeper import LeaseKeeper, ShardCancelled
from farm.worker.memory import OutOfMemory, is_out_of_memory, out_of_memory
from farm.worker.resources import WorkerResources
from farm.worker.shard_run import ShardHandBack, ShardRun
from storage.blocklist import is_blocked, record_failure_streak, record_success, unblocked_workers
from storage.db import session_scope
from storage.leases import (
    ShardClaim,
    add_artifacts,
    claim_shard,
    claim_shard_to_render,
    finish_shard,
    hand_back,
    record_failure,
)
from storage.models import Artifact, Job, Shard
from storage.objects import ObjectStore
from storage.recovery import fail_crash_loop, unfinished_shard
from storage.status import ShardStatus
from storage.transitions import claim_rollup

log = logging.getLogger(__name__)


class InjectedFault(UserError):
    """A failure requested by ``worker.fail_shards`` (fault drills and tests)."""


class InjectedWorkerFault(FarmError):
    """A retryable failure requested by ``worker.fail_shards`` with ``fail_shards_retryable``:
    this worker behaves as if broken (fault drills of the blocklist)."""

    retryable = True


REJECT_DELAY_S = 0.5  # a blocked worker pauses this long before handing a shard back


@dataclass(frozen=True)
class ShardOutcome:
    """What happened to one delivery of a shard message, for the task to act on (and, through the
    task's result, for Flower: which shard, how many items it has done, where its outputs go)."""

    # succeeded | failed | cancelled | retry | skipped | busy | fenced | rejected | handed_back | preempted
    # | drained (the worker is stopping: handed back after an item, or passed on unclaimed)
    status: str
    job_id: uuid.UUID | None = None
    retry_in: float | None = None
    error: str | None = None
    shard_index: int | None = None  # known once the delivery has read its shard
    items: int | None = None
    items_done: int | None = None  # of ``items``, when the shard succeeded
    outputs: str | None = None  # the folder (or bucket prefix) of its outputs
    finalize: bool = True  # send the job's finalize (a terminal outcome; see _deliver)
    queue: str | None = None  # the shard's queue, once claimed: its window is topped up after
    charge: Charge | None = None  # the attempt's render time, for the fair-share ledger

    @property
    def terminal(self) -> bool:
        return self.status in {"succeeded", "failed", "cancelled"}


@dataclass
class _Delivery:
    """What the metrics and the task's result need to know about one delivery."""

    queue: str = "unknown"
    timings: dict[str, float] = field(default_factory=dict)
    items: int = 0
    seconds: float = 0.0
    index: int | None = None
    items_total: int | None = None
    outputs: str | None = None
    job: _Job | None = None  # once claimed
    started: float = 0.0  # time.perf_counter() at the claim
    run: ShardRun | None = None  # once rendering
    items_before: int = 0  # items done by earlier attempts


def execute_shard(
    res: WorkerResources, shard_id: uuid.UUID, sent_at: float | None = None, job_id: uuid.UUID | None = None
) -> ShardOutcome:
    """Render one shard if this delivery can take it; safe to call for any delivery. ``job_id``:
    the shard's job as its message says (saves a query when the blocklist is on)."""
    delivery = _Delivery()
    outcome = _deliver(res, shard_id, sent_at, delivery, job_id)
    if res.metrics is not None:
        res.metrics.observe_shard(delivery.queue, outcome.status, delivery.timings, delivery.items, delivery.seconds)
    charge = None
    if delivery.job is not None:  # claimed: the attempt's time goes to its project and owner
        # Loading a model is the worker's cost, not the job's: which shard of which project finds
        # a cold cache is chance, and a load's minutes would outweigh many renders.
        seconds = (delivery.seconds or time.perf_counter() - delivery.started) - delivery.timings.get("load_s", 0.0)
        job = delivery.job
        rendered = delivery.run.items_done - delivery.items_before if delivery.run is not None else 0
        charge = Charge(job.project_id, job.owner_id, round(max(0.0, seconds), 4), max(0, rendered))
    return replace(
        outcome,
        queue=delivery.queue if delivery.job is not None else None,
        charge=charge,
        shard_index=delivery.index,
        items=delivery.items_total,
        items_done=delivery.items if outcome.status == "succeeded" else None,
        outputs=delivery.outputs,
    )


def output_location(store: ObjectStore, keys: list[str]) -> str | None:
    """Where the objects ``keys`` are, for people: their common folder, as a path for a local
    store and as ``s3://bucket/prefix`` for S3."""
    if not keys:
        return None
    folder = posixpath.commonpath(keys) if len(keys) > 1 else posixpath.dirname(keys[0])
    root = getattr(store, "root", None)  # LocalStore
    if root is not None:
        return str(Path(root) / folder)
    bucket = getattr(store, "bucket", None)  # S3Store: keys are relative to its prefix
    if bucket is not None:
        return f"s3://{bucket}/" + "/".join(p for p in (getattr(store, "prefix", ""), folder) if p)
    return folder


def _deliver(
    res: WorkerResources, shard_id: uuid.UUID, sent_at: float | None, delivery: _Delivery, job_id: uuid.UUID | None
) -> ShardOutcome:
    """One write transaction to claim (with everything the render needs read in it), the render,
    one write transaction to end the attempt with its artifact rows: a shard that renders within
    ``worker.progress_interval_s`` writes nothing in between."""
    settings = res.settings.worker
    if res.draining.is_set():  # stopping: another worker takes it (the message is sent again)
        return ShardOutcome("drained", job_id, retry_in=0.0)
    claimed_at, claimed_mono = time.time(), time.monotonic()
    with session_scope(res.session_factory) as session:
        if settings.blocklist_after:
            refused = _blocked_delivery(session, res, shard_id, job_id)
            if refused is not None:
                return refused
        claim = claim_shard_to_render(
            session, shard_id, res.name, settings.lease_seconds, max_attempts=settings.max_attempts
        )
        if claim is None:
            return ShardOutcome("skipped")
        delivery.queue, lease = claim.queue, claim.lease
        if lease is None:
            remaining = claim.lease_remaining()
            # An expired lease we may not take over: its workers died on every attempt.
            crashed = fail_crash_loop(session, shard_id, settings.max_attempts) if remaining == 0.0 else None
        else:
            job = delivery.job = _job_of(res, session, claim.job_id)
            # Only a shard claimed before (a retry, a take-over, a hand back) can have outputs.
            done_keys = _written_keys(session, shard_id) if lease.fencing_token > 1 else set()
    if lease is None and crashed is not None:
        log.warning("shard %s failed for good: %s", shard_id, crashed)
        return ShardOutcome("failed", claim.job_id, error=crashed)
    if lease is None:
        if remaining is not None:
            # Held by a live lease: look again once it could have expired (its holder may be dead).
            return ShardOutcome("busy", claim.job_id, retry_in=remaining + 1.0)
        return ShardOutcome("skipped", claim.job_id)

    timings = delivery.timings
    timings["queue_wait_s"] = round(max(0.0, claimed_at - sent_at), 4) if sent_at else 0.0
    res.current_shard = shard_id
    started = delivery.started = time.perf_counter()
    interval = min(settings.heartbeat_seconds, max(settings.progress_interval_s, 0.05))
    keeper = LeaseKeeper(res.session_factory, lease, settings.lease_seconds, interval, settings.heartbeat_seconds)
    try:
        with keeper:
            delivery.items = _render_items(res, claim, job, done_keys, keeper, delivery, claimed_mono)
            lease = keeper.lease
        delivery.seconds = time.perf_counter() - started
        rows, unsure = keeper.take_artifacts(), keeper.unsure
        rollup_due = False

        def succeed() -> None:
            nonlocal unsure, rollup_due
            with session_scope(res.session_factory) as session:
                finish_shard(session, lease, ShardStatus.SUCCEEDED, timings=timings, items_done=delivery.items)
                add_artifacts(session, lease, rows, maybe_written=unsure)
                if res.blocklist_row(session, lease.job_id):
                    record_success(session, lease.job_id, res.name)
                rollup_due = claim_rollup(session, lease.job_id, settings.rollup_interval_s)
                unsure = True  # a try that fails from here on may have committed

        def succeeded() -> bool:  # an earlier try committed before its connection dropped
            with session_scope(res.session_factory) as session:
                return _finished_by(session, lease, ShardStatus.SUCCEEDED)

        res.outlast(succeed, f"shard {shard_id}: finishing", landed=succeeded)
        # A job is rolled up at most once per worker.rollup_interval_s while it runs, and finalized
        # by the shard that ends it (the window is topped up by the worker: shard_delivery).
        finalize = rollup_due or res.outlast(lambda: _job_ended(res, lease.job_id), "job end")
        return ShardOutcome("succeeded", lease.job_id, finalize=finalize)
    except LeaseLost as exc:
        log.warning("shard %s: %s", shard_id, exc)
        return ShardOutcome("fenced", lease.job_id, error=str(exc))
    except ShardHandBack as back:
        log.info("%s", back)

        rows = keeper.take_artifacts()  # taken once: a retried step must still write them
        to_feeder = back.to_feeder
        run = delivery.run
        done = {"items_done": run.items_done, "items": len(run.items)} if run is not None else {}

        def release() -> None:
            with session_scope(res.session_factory) as session:
                hand_back(session, keeper.lease, preempted=to_feeder, **done)
                add_artifacts(session, keeper.lease, rows, maybe_written=True)

        try:
            res.outlast(release, f"shard {shard_id}: hand back")
        except LeaseLost as exc:
            return ShardOutcome("fenced", lease.job_id, error=str(exc))
        if to_feeder:  # preempted or drained: PENDING again, the feeder sends it in its turn
            return ShardOutcome(back.reason, lease.job_id)
        return ShardOutcome("handed_back", lease.job_id, retry_in=0.0)
    except ShardCancelled:
        try:
            with session_scope(res.session_factory) as session:
                finish_shard(session, keeper.lease, ShardStatus.CANCELLED, error="job cancelled", timings=timings)
                add_artifacts(session, keeper.lease, keeper.take_artifacts(), maybe_written=keeper.unsure)
        except LeaseLost as exc:
            return ShardOutcome("fenced", lease.job_id, error=str(exc))
        return ShardOutcome("cancelled", lease.job_id, error="job cancelled")
    except Exception as exc:  # every failure is recorded on the shard, the worker keeps serving
        message = describe_error(exc)
        log.exception("shard %s failed: %s", shard_id, message)
        limits = exc.limits if isinstance(exc, OutOfMemory) else None
        return _record_failure(res, keeper, exc, message, timings, limits)
    finally:
        res.current_shard = None


@dataclass(frozen=True)
class _Job:
    """What a worker keeps of a job across its shards (a job's spec never changes): the stored
    spec, whether the job is part of a bulk run, whose it is (the fair-share ledger is charged),
    and the spec parsed on first use (outside the claim's transaction, so a spec that no longer
    parses fails the shard, not the claim)."""

    stored_spec: dict[str, Any]
    bulk: bool
    project_id: uuid.UUID
    owner_id: uuid.UUID

    @functools.cached_property
    def spec(self) -> JobSpec:
        return parse_spec(self.stored_spec)


def _job_of(res: WorkerResources, session: Any, job_id: uuid.UUID) -> _Job:
    """The job's stored spec and whether it is part of a bulk run: read once per worker."""

    def read() -> _Job:
        row = session.execute(select(Job.spec, Job.bulk_id, Job.project_id, Job.owner_id).where(Job.id == job_id)).one()
        return _Job(row.spec, row.bulk_id is not None, row.project_id, row.owner_id)

    return res.jobs.remember(job_id, read)


def _written_keys(session: Any, shard_id: uuid.UUID) -> set[str]:
    """The outputs earlier attempts of the shard recorded (a retry skips them)."""
    return set(session.scalars(select(Artifact.key).where(Artifact.shard_id == shard_id)))


def _job_ended(res: WorkerResources, job_id: uuid.UUID) -> bool:
    """Whether every shard of the job has ended (read after this shard's end committed: two
    shards ending together both see it, and the finalize they both send is idempotent)."""
    with session_scope(res.session_factory) as session:
        return not session.scalar(select(unfinished_shard(job_id)))


def _blocked_delivery(
    session: Any, res: WorkerResources, shard_id: uuid.UUID, job_id: uuid.UUID | None
) -> ShardOutcome | None:
    """The answer for a worker blocked from the shard's job (``None``: not blocked). Only a worker
    with a failure record on the job can be: after a first look, known without a query."""
    if job_id is None:
        job_id = session.scalar(select(Shard.job_id).where(Shard.id == shard_id))
    if job_id is None or not res.blocklist_row(session, job_id) or not is_blocked(session, job_id, res.name):
        return None
    queue = session.scalar(select(Shard.queue).where(Shard.id == shard_id))
    return _refuse_blocked(session, res, shard_id, job_id, queue)


def _finished_by(session: Any, lease: Any, status: ShardStatus) -> bool:
    """Whether this very attempt already ended the shard with ``status``."""
    row = session.execute(select(Shard.status, Shard.fencing_token).where(Shard.id == lease.shard_id)).one()
    return row.status == status and row.fencing_token == lease.fencing_token


def _record_failure(
    res: WorkerResources,
    keeper: LeaseKeeper,
    exc: Exception,
    message: str,
    timings: dict[str, float],
    memory: dict[str, Any] | None = None,
) -> ShardOutcome:
    """Keep the error, retry or fail the shard (attempts, distinct workers), and count the
    failure towards this worker's streak on the job when a retry could have helped. ``memory``:
    the smaller limits a retry after an out-of-memory renders under. The outputs the attempt
    uploaded keep their artifact rows: a retry skips them."""
    settings = res.settings.worker
    retryable = not isinstance(exc, UserError) and (not isinstance(exc, FarmError) or exc.retryable)
    lease, rows, unsure = keeper.lease, keeper.take_artifacts(), keeper.unsure

    def record() -> tuple[ShardStatus, bool]:
        nonlocal unsure
        with session_scope(res.session_factory) as session:
            status = record_failure(
                session,
                lease,
                message,
                retryable=retryable,
                max_attempts=settings.max_attempts,
                max_workers=settings.max_workers_per_shard,
                timings=timings,
                memory=memory,
            )
            add_artifacts(session, lease, rows, maybe_written=unsure)
            blocked = retryable and record_failure_streak(
                session, lease.job_id, res.name, message, block_after=settings.blocklist_after
            )
            unsure = True  # a try that fails from here on may have committed
        if retryable:
            res.remember_blocklist_row(lease.job_id)
        return status, blocked

    try:
        status, blocked = res.outlast(record, f"shard {lease.shard_id}: recording its failure")
    except LeaseLost as lost:
        return ShardOutcome("fenced", lease.job_id, error=str(lost))
    if blocked:
        log.warning(
            "worker %s failed %d shards of job %s in a row: it no longer takes that job's shards",
            res.name,
            settings.blocklist_after,
            lease.job_id,
        )
    if status == ShardStatus.QUEUED:
        return ShardOutcome("retry", lease.job_id, retry_in=min(60.0, 2.0**lease.attempt), error=message)
    return ShardOutcome("failed", lease.job_id, error=message)


def _refuse_blocked(
    session: Any, res: WorkerResources, shard_id: uuid.UUID, job_id: uuid.UUID, queue: str
) -> ShardOutcome | None:
    """This worker is blocked from the job: hand the shard back for another worker, or fail it
    when no live worker on its queue may take it. ``None``: the shard is not there to take."""
    settings = res.settings.worker
    if unblocked_workers(session, job_id, queue, settings.lost_after_s):
        return ShardOutcome("rejected", job_id, retry_in=REJECT_DELAY_S)
    lease = claim_shard(session, shard_id, res.name, settings.lease_seconds)
    if lease is None:
        return None  # terminal, or held by a live lease: the usual answer
    message = f"every live worker on {queue} is blocked from this job (worker.blocklist_after)"
    finish_shard(session, lease, ShardStatus.FAILED, error=message)
    return ShardOutcome("failed", job_id, error=message)


HAND_BACK_SHARE = 0.75  # of RabbitMQ's consumer_timeout a delivery may use before handing back


def _delivery_deadline(settings: FarmSettings, claimed_at: float) -> float | None:
    """When (``time.monotonic()``) a delivery that began at ``claimed_at`` must stop taking new
    items: RabbitMQ closes a channel whose message stays unacknowledged past consumer_timeout,
    and Celery then stops the whole worker."""
    timeout = settings.broker.consumer_timeout_s
    if timeout is None or not settings.broker.url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return None
    return claimed_at + HAND_BACK_SHARE * timeout


def _drill_hold(keeper: LeaseKeeper, shard_index: int, seconds: float) -> None:
    """``worker.slow_shards`` (fault drills): hold a claimed shard ``seconds`` before rendering it,
    as a slow GPU would, still stopping for a cancelled job or a lost lease."""
    log.warning("shard %d: held %.0f s before rendering (worker.slow_shards, a fault drill)", shard_index, seconds)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        keeper.check()
        time.sleep(min(0.25, left))
    keeper.check()


def _render_items(
    res: WorkerResources,
    claim: ShardClaim,
    job: _Job,
    done_keys: set[str],
    keeper: LeaseKeeper,
    delivery: _Delivery,
    claimed_at: float,
) -> int:
    shard_id, job_id, shard_index, params = claim.lease.shard_id, claim.job_id, claim.index, claim.params
    items, memory = list(params["items"]), dict(params.get("memory") or {})
    timings = delivery.timings
    delivery.index, delivery.items_total = shard_index, len(items)
    delivery.outputs = output_location(res.store, [item["key"] for item in items])
    spec = job.spec
    if shard_index in res.settings.worker.fail_shards:
        fault = InjectedWorkerFault if res.settings.worker.fail_shards_retryable else InjectedFault
        raise fault(f"shard {shard_index}: injected fault (worker.fail_shards)")
    keeper.check()
    kind = job_kind(spec.kind)
    runner = kind.runner()

    cache = loaded = None
    model = kind.model_of(spec)  # None: a job without a model (a post-step on farm.cpu) never builds the cache
    if model is not None:
        started = time.perf_counter()
        cache = res.model_cache()
        loads = cache.loads
        loaded = cache.get(*model)
        timings["load_s"] = round(time.perf_counter() - started, 4)
        timings["model_loaded"] = float(cache.loads > loads)  # a load, not a cache hit (farm.demand measures loads)
        if res.metrics is not None:
            res.metrics.observe_model(model[1], loaded=cache.loads > loads)
    fingerprint = ""
    if loaded is not None and kind.runtime_applies_patches:  # else the runner applies its own patches
        started = time.perf_counter()
        fingerprint = apply_job_patches(loaded, spec, res=res)
        timings["patch_s"] = round(time.perf_counter() - started, 4)
    timings["denoise_s"] = timings["upload_s"] = 0.0
    run = ShardRun(
        res, job_id, shard_id, shard_index, spec, items, done_keys, keeper, loaded, timings, fingerprint, memory=memory
    )
    run.deadline = _delivery_deadline(res.settings, claimed_at)
    run.items_done = delivery.items_before = sum(1 for item in items if item["key"] in done_keys)
    delivery.run = run
    run.hand_back_if_draining()  # told to stop while the model loaded
    if shard_index in res.settings.worker.slow_shards:
        _drill_hold(keeper, shard_index, res.settings.worker.slow_shards_s)
    try:
        done = runner(run)
    except Exception as exc:
        if cache is None or not is_out_of_memory(exc):
            raise
        raise out_of_memory(exc, spec, memory, cache.placement.device) from exc
    timings["items"] = float(len(items))
    return done
