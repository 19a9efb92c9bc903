"""Running one shard: claim, render each item, upload, record, finish.

:class:`WorkerResources` is what a worker process owns (settings, database, object store, model
and component caches, the heartbeat and reconciler threads it holds); it is created once per
process at worker start and closed at its shutdown. :func:`execute_shard` is what the
``render_shard`` task calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from farm.errors import FarmError, LeaseLost, UserError
from farm.settings import FarmSettings
from farm.worker.lease_keeper import LeaseKeeper, ShardCancelled
from farm.worker.memory import OutOfMemory, is_out_of_memory, out_of_memory
from farm.worker.shard_run import ShardHandBack
from storage.blocklist import is_blocked, record_failure_streak, record_success, unblocked_workers
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, Job, Shard
from storage.objects import ObjectStore, open_store
from storage.recovery import fail_crash_loop
from storage.status import ShardStatus
from storage.transitions import claim_shard, finish_shard, hand_back, lease_remaining, record_failure

log = logging.getLogger(__name__)


class JobMemo(OrderedDict):
    """Data a worker derives per job and reuses across that job's shards (reference embeddings,
    face analyses); only the ``limit`` most recently used entries are kept."""

    def __init__(self, limit: int = 64) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: Any, make: Any) -> Any:
        """The value for ``key``, computed by ``make()`` the first time."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)
        return value


class ResourcesClosed(FarmError):
    """The worker's resources were closed (it is shutting down): nothing more is loaded here,
    another worker may."""

    retryable = True


@dataclass
class WorkerResources:
    """Everything one worker process holds for its lifetime. A context manager: leaving it (or
    :meth:`close`, which Celery's ``worker_shutdown`` calls, see :mod:`farm.celery_app`) releases
    it all."""

    settings: FarmSettings
    session_factory: Any
    store: ObjectStore
    name: str
    engine: Any = None
    cache: Any = None  # farm.worker.model_cache.ModelCache, built on first render (imports torch)
    components: Any = None  # a second ModelCache for IP-Adapters, image encoders, ControlNets, face analysis
    memo: JobMemo = field(default_factory=JobMemo)  # per-job derived data (reference embeddings)
    metrics: Any = None  # farm.worker.metrics.WorkerMetrics when worker.metrics_port is set
    current_shard: uuid.UUID | None = None
    closed: bool = False
    _held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)
    _held_names: list[str] = field(default_factory=list, repr=False)
    _close_lock: Any = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, settings: FarmSettings, name: str | None = None) -> WorkerResources:
        engine = make_engine(settings.database_url, pool_size=settings.db.pool_size)
        name = name or f"{socket.gethostname()}-{os.getpid()}"
        return cls(settings, make_session_factory(engine), open_store(settings), name, engine)

    def __enter__(self) -> WorkerResources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hold(self, context: Any, what: str) -> Any:
        """Enter ``context`` (the heartbeat, the reconciler loop: ``what``) and exit it at the start
        of :meth:`close`, while the database is still there; returns what entering it returned."""
        if self.closed:
            raise ResourcesClosed(f"worker {self.name} is shutting down: nothing more is started")
        entered = self._held.enter_context(context)
        self._held_names.append(what)
        return entered

    def component_cache(self) -> Any:
        """Pinned auxiliary models (IP-Adapters, image encoders, ControlNets, face analysis),
        beside the pipelines, LRU under ``worker.component_cache_mb``."""
        if self.closed:
            raise ResourcesClosed(f"worker {self.name} is shutting down: its model caches are closed")
        if self.components is None:
            from farm.worker.components import component_bytes, load_component
            from farm.worker.model_cache import ModelCache

            self.components = ModelCache(
                self.model_cache().placement,
                self.settings.worker.component_cache_mb * (1 << 20),
                loader=load_component,
                measure=component_bytes,
                name="component cache",
            )
        return self.components

    def model_cache(self) -> Any:
        """The process's model cache, created on first use (control-only workers never need torch)."""
        if self.closed:
            raise ResourcesClosed(f"worker {self.name} is shutting down: its model caches are closed")
        if self.cache is None:
            from farm.worker.devices import resolve_placement
            from farm.worker.model_cache import ModelCache

            placement = resolve_placement(self.settings.worker.device, self.settings.worker.dtype)
            self.cache = ModelCache(placement, self.settings.worker.model_cache_mb * (1 << 20))
        return self.cache

    def outlast(self, step: Any, what: str, check: Any = None, landed: Any = None) -> Any:
        """``step()`` retried through database, broker and object-store outages for at most
        ``worker.service_wait_s`` (see :func:`farm.outages.ride_out`)."""
        from farm.outages import ride_out

        return ride_out(step, what=what, wait_s=self.settings.worker.service_wait_s, check=check, landed=landed)

    def close(self) -> None:
        """Release what this process holds, once (a second call does nothing): the threads it
        holds (the heartbeat marks the worker stopped), the metrics server, the pinned components
        and models (the references dropped, the garbage collected and, on a CUDA device, the
        allocator's cache emptied), the per-job memo, the object store's client and the database
        engine's pool. A failed step is logged and the others still run. Logs ``worker resources
        closed: ...`` naming what was released."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        released: list[str] = []

        def step(what: str, action: Any) -> None:
            try:
                done = action()
            except Exception as exc:  # close everything else regardless
                log.warning("worker %s: closing %s failed: %s", self.name, what, _describe(exc))
            else:
                if done:
                    released.append(done)

        if self.current_shard is not None:  # a cold shutdown: that render ends with the process
            log.warning("worker %s: closing its resources while shard %s runs", self.name, self.current_shard)
        step("threads", self._close_held)
        step("metrics server", self._close_metrics)
        step("component cache", lambda: self._close_cache("components", "component"))
        step("model cache", lambda: self._close_cache("cache", "model"))
        step("job memo", self._close_memo)
        step("memory", self._release_memory)
        step("object store", self._close_store)
        step("database engine", self._close_engine)
        log.info("worker resources closed: %s: %s", self.name, "; ".join(released) or "nothing was open")

    def _close_held(self) -> str | None:
        names, self._held_names = self._held_names, []
        self._held.close()
        return f"{' and '.join(names)} stopped" if names else None

    def _close_metrics(self) -> str | None:
        if self.metrics is None or getattr(self.metrics, "server", None) is None:
            return None
        self.metrics.close()
        return "metrics server stopped"

    def _close_cache(self, attribute: str, what: str) -> str | None:
        cache = getattr(self, attribute)
        if cache is None:
            return None
        dropped = cache.clear()
        return f"{what} cache: {dropped} pinned {what}{'' if dropped == 1 else 's'} dropped"

    def _close_memo(self) -> str | None:
        entries = len(self.memo)
        self.memo.clear()
        return f"job memo: {entries} entr{'y' if entries == 1 else 'ies'} dropped" if entries else None

    def _release_memory(self) -> str | None:
        cache = self.cache or self.components
        if cache is None:  # nothing was ever loaded (a control-only worker never imports torch)
            return None
        from farm.worker.memory import release_memory

        device = str(cache.placement.device)
        release_memory(device)  # gc, and on CUDA the allocator's free blocks
        return f"memory released ({'CUDA cache emptied' if device.startswith('cuda') else device})"

    def _close_store(self) -> str | None:
        close = getattr(self.store, "close", None)
        if callable(close):
            close()
            return "object store closed"
        client = getattr(self.store, "_client", None)  # S3Store: its boto3 client's connection pool
        if client is not None and callable(getattr(client, "close", None)):
            client.close()
            return "object store client closed"
        return None  # a local folder holds nothing open

    def _close_engine(self) -> str | None:
        if self.engine is None:
            return None
        self.engine.dispose()
        return "database engine disposed"


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

    status: str  # succeeded | failed | cancelled | retry | skipped | busy | fenced | rejected | handed_back
    job_id: uuid.UUID | None = None
    retry_in: float | None = None
    error: str | None = None
    shard_index: int | None = None  # known once the delivery has read its shard
    items: int | None = None
    items_done: int | None = None  # of ``items``, when the shard succeeded
    outputs: str | None = None  # the folder (or bucket prefix) of its outputs

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


def execute_shard(res: WorkerResources, shard_id: uuid.UUID, sent_at: float | None = None) -> ShardOutcome:
    """Render one shard if this delivery can take it; safe to call for any delivery."""
    delivery = _Delivery()
    outcome = _deliver(res, shard_id, sent_at, delivery)
    if res.metrics is not None:
        res.metrics.observe_shard(delivery.queue, outcome.status, delivery.timings, delivery.items, delivery.seconds)
    return replace(
        outcome,
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


def _deliver(res: WorkerResources, shard_id: uuid.UUID, sent_at: float | None, delivery: _Delivery) -> ShardOutcome:
    settings = res.settings.worker
    claimed_at, claimed_mono = time.time(), time.monotonic()
    with session_scope(res.session_factory) as session:
        row = session.execute(select(Shard.job_id, Shard.queue).where(Shard.id == shard_id)).one_or_none()
        if row is None:
            return ShardOutcome("skipped")
        delivery.queue = row.queue
        if settings.blocklist_after and is_blocked(session, row.job_id, res.name):
            refused = _refuse_blocked(session, res, shard_id, row.job_id, row.queue)
            if refused is not None:
                return refused
        lease = claim_shard(session, shard_id, res.name, settings.lease_seconds, max_attempts=settings.max_attempts)
        if lease is None:
            remaining = lease_remaining(session, shard_id)
            # An expired lease we may not take over: its workers died on every attempt.
            crashed = fail_crash_loop(session, shard_id, settings.max_attempts) if remaining == 0.0 else None
    if lease is None and crashed is not None:
        log.warning("shard %s failed for good: %s", shard_id, crashed)
        return ShardOutcome("failed", row.job_id, error=crashed)
    if lease is None:
        if remaining is not None:
            # Held by a live lease: look again once it could have expired (its holder may be dead).
            return ShardOutcome("busy", row.job_id, retry_in=remaining + 1.0)
        return ShardOutcome("skipped", row.job_id)

    timings = delivery.timings
    timings["queue_wait_s"] = round(max(0.0, claimed_at - sent_at), 4) if sent_at else 0.0
    res.current_shard = shard_id
    started = time.perf_counter()
    interval = min(settings.heartbeat_seconds, max(settings.progress_interval_s, 0.05))
    keeper = LeaseKeeper(res.session_factory, lease, settings.lease_seconds, interval)
    try:
        with keeper:
            delivery.items = _render_items(res, lease.shard_id, lease.job_id, keeper, delivery, claimed_mono)
            lease = keeper.lease
        delivery.seconds = time.perf_counter() - started

        def succeed() -> None:
            with session_scope(res.session_factory) as session:
                finish_shard(session, lease, ShardStatus.SUCCEEDED, timings=timings, items_done=delivery.items)
                record_success(session, lease.job_id, res.name)

        def succeeded() -> bool:  # an earlier try committed before its connection dropped
            with session_scope(res.session_factory) as session:
                return _finished_by(session, lease, ShardStatus.SUCCEEDED)

        res.outlast(succeed, f"shard {shard_id}: finishing", landed=succeeded)
        return ShardOutcome("succeeded", lease.job_id)
    except LeaseLost as exc:
        log.warning("shard %s: %s", shard_id, exc)
        return ShardOutcome("fenced", lease.job_id, error=str(exc))
    except ShardHandBack as back:
        log.info("%s", back)

        def release() -> None:
            with session_scope(res.session_factory) as session:
                hand_back(session, keeper.lease)

        try:
            res.outlast(release, f"shard {shard_id}: hand back")
        except LeaseLost as exc:
            return ShardOutcome("fenced", lease.job_id, error=str(exc))
        return ShardOutcome("handed_back", lease.job_id, retry_in=0.0)
    except ShardCancelled:
        try:
            with session_scope(res.session_factory) as session:
                finish_shard(session, keeper.lease, ShardStatus.CANCELLED, error="job cancelled", timings=timings)
        except LeaseLost as exc:
            return ShardOutcome("fenced", lease.job_id, error=str(exc))
        return ShardOutcome("cancelled", lease.job_id, error="job cancelled")
    except Exception as exc:  # every failure is recorded on the shard, the worker keeps serving
        message = _describe(exc)
        log.exception("shard %s failed: %s", shard_id, message)
        limits = exc.limits if isinstance(exc, OutOfMemory) else None
        return _record_failure(res, keeper.lease, exc, message, timings, limits)
    finally:
        res.current_shard = None


def _finished_by(session: Any, lease: Any, status: ShardStatus) -> bool:
    """Whether this very attempt already ended the shard with ``status``."""
    row = session.execute(select(Shard.status, Shard.fencing_token).where(Shard.id == lease.shard_id)).one()
    return row.status == status and row.fencing_token == lease.fencing_token


def _record_failure(
    res: WorkerResources,
    lease: Any,
    exc: Exception,
    message: str,
    timings: dict[str, float],
    memory: dict[str, Any] | None = None,
) -> ShardOutcome:
    """Keep the error, retry or fail the shard (attempts, distinct workers), and count the
    failure towards this worker's streak on the job when a retry could have helped. ``memory``:
    the smaller limits a retry after an out-of-memory renders under."""
    settings = res.settings.worker
    retryable = not isinstance(exc, UserError) and (not isinstance(exc, FarmError) or exc.retryable)

    def record() -> tuple[ShardStatus, bool]:
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
            blocked = retryable and record_failure_streak(
                session, lease.job_id, res.name, message, block_after=settings.blocklist_after
            )
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


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:2000] if not isinstance(exc, FarmError) else text[:2000]


# Runners by job kind: "module:function" taking a ShardRun and returning the items done.
RUNNERS = {
    "text_to_image": "farm.worker.renderers:run_text_to_image_shard",
    "temporal_video": "farm.worker.video:run_temporal_video_shard",
    "face_identity": "farm.worker.identity:run_face_identity_shard",
}


def _runner(kind: str) -> Any:
    import importlib

    if kind not in RUNNERS:
        raise FarmError(f"job kind {kind!r} has no runner on this worker")
    module, _, name = RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


class PatchFailed(UserError):
    """The job's patches cannot be applied to its model (a user error: fix the spec)."""


def apply_job_patches(loaded: Any, spec: Any, extra: list[Any] | tuple[Any, ...] = ()) -> str:
    """Make the job's patch set (then ``extra``, patches a runner builds itself) the one applied
    to the resident model: a no-op when the last job used the same set. Returns its fingerprint."""
    from farm.patch_specs import build_patches
    from patching import ModelPatcher, PatchError

    if loaded.patcher is None:
        loaded.patcher = ModelPatcher(loaded.pipeline)
    try:
        loaded.patcher.ensure(build_patches(spec, extra))
    except PatchError as exc:
        raise PatchFailed(f"patches: {exc}") from None
    return loaded.patcher.fingerprint


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
    shard_id: uuid.UUID,
    job_id: uuid.UUID,
    keeper: LeaseKeeper,
    delivery: _Delivery,
    claimed_at: float,
) -> int:
    from farm.specs import parse_spec
    from farm.worker.shard_run import ShardRun

    def read() -> tuple[dict[str, Any], list[dict[str, Any]], int, set[str]]:
        with session_scope(res.session_factory) as session:
            spec = session.scalar(select(Job.spec).where(Job.id == job_id))
            shard = session.get(Shard, shard_id)
            done = set(session.scalars(select(Artifact.key).where(Artifact.shard_id == shard_id)))
            return spec, shard.params, shard.index, done

    raw_spec, params, shard_index, done_keys = res.outlast(read, f"shard {shard_id}: reading", keeper.check)
    items, memory = list(params["items"]), dict(params.get("memory") or {})
    timings = delivery.timings
    delivery.index, delivery.items_total = shard_index, len(items)
    delivery.outputs = output_location(res.store, [item["key"] for item in items])
    spec = parse_spec(raw_spec)
    if shard_index in res.settings.worker.fail_shards:
        fault = InjectedWorkerFault if res.settings.worker.fail_shards_retryable else InjectedFault
        raise fault(f"shard {shard_index}: injected fault (worker.fail_shards)")
    keeper.check()
    runner = _runner(spec.kind)

    started = time.perf_counter()
    cache = res.model_cache()
    loads = cache.loads
    loaded = cache.get(spec.model, spec.family)
    timings["load_s"] = round(time.perf_counter() - started, 4)
    if res.metrics is not None:
        res.metrics.observe_model(spec.family, loaded=cache.loads > loads)
    fingerprint = ""
    if not getattr(runner, "applies_patches", False):  # else the runner adds its own and applies
        started = time.perf_counter()
        fingerprint = apply_job_patches(loaded, spec)
        timings["patch_s"] = round(time.perf_counter() - started, 4)
    timings["denoise_s"] = timings["upload_s"] = 0.0
    run = ShardRun(
        res, job_id, shard_id, shard_index, spec, items, done_keys, keeper, loaded, timings, fingerprint, memory=memory
    )
    run.deadline = _delivery_deadline(res.settings, claimed_at)
    run.items_done = sum(1 for item in items if item["key"] in done_keys)
    if shard_index in res.settings.worker.slow_shards:
        _drill_hold(keeper, shard_index, res.settings.worker.slow_shards_s)
    try:
        done = runner(run)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(exc, spec, memory, cache.placement.device) from exc
    timings["items"] = float(len(items))
    return done
