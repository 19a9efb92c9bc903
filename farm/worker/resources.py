"""What a worker process owns for its lifetime: :class:`WorkerResources`.

Settings, the database engine and sessions, the object store, the model and component caches (LRU
under their budgets), the per-job memo, and the threads it holds (heartbeat, reconciler). Created
once per process at worker start; a context manager, closed at the worker's shutdown.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from farm.errors import FarmError, describe_error
from farm.outages import ride_out
from farm.settings import FarmSettings
from farm.worker.components import component_bytes, load_component
from farm.worker.devices import resolve_placement
from farm.worker.memory import release_memory
from farm.worker.model_cache import ModelCache, load_pipeline
from farm.worker.model_store import HostModelStore, host_model_store
from storage.blocklist import has_record
from storage.db import make_engine, make_session_factory
from storage.objects import ObjectStore, open_store

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
        return self.put(key, make())

    def put(self, key: Any, value: Any) -> Any:
        """Keep ``value`` for ``key`` as the most recently used entry; returns it."""
        self[key] = value
        self.move_to_end(key)
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
    models: HostModelStore | None = None  # registry models on this host's disk, made on first use
    components: Any = None  # a second ModelCache for IP-Adapters, image encoders, ControlNets, face analysis
    memo: JobMemo = field(default_factory=JobMemo)  # per-job derived data (reference embeddings)
    jobs: JobMemo = field(default_factory=lambda: JobMemo(256))  # job id -> spec (stored and parsed), bulk or not
    _blocklist_rows: JobMemo = field(default_factory=lambda: JobMemo(1024), repr=False)
    metrics: Any = None  # farm.worker.metrics.WorkerMetrics when worker.metrics_port is set
    current_shard: uuid.UUID | None = None
    # Set when the worker was told to stop (SIGTERM, farm.worker.drain): no new shard is claimed,
    # the running one hands back after its current item.
    draining: threading.Event = field(default_factory=threading.Event)
    closed: bool = False
    _held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)
    _held_names: list[str] = field(default_factory=list, repr=False)
    _close_lock: Any = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, settings: FarmSettings, name: str | None = None) -> WorkerResources:
        engine = make_engine(settings.database_url, pool_size=settings.db.pool_size)
        name = name or f"{socket.gethostname()}-{os.getpid()}"
        store = open_store(settings.storage, settings.data_dir)
        return cls(settings, make_session_factory(engine), store, name, engine)

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
            self.components = ModelCache(
                self.model_cache().placement,
                self.settings.worker.component_cache_mb * (1 << 20),
                loader=load_component,
                measure=component_bytes,
                name="component cache",
            )
        return self.components

    def host_models(self) -> HostModelStore:
        """This host's cache of registry models (``worker.model_dir``), shared with the host's
        other workers; made on first use."""
        if self.models is None:
            self.models = host_model_store(self.settings, self.store)
        return self.models

    def model_cache(self) -> Any:
        """The process's model cache, created on first use (control-only workers never need torch)."""
        if self.closed:
            raise ResourcesClosed(f"worker {self.name} is shutting down: its model caches are closed")
        if self.cache is None:
            placement = resolve_placement(self.settings.worker.device, self.settings.worker.dtype)
            models = self.host_models()
            self.cache = ModelCache(
                placement,
                self.settings.worker.model_cache_mb * (1 << 20),
                loader=functools.partial(load_pipeline, models=models),
                on_drop=lambda loaded: models.release(loaded.model_hash),
            )
        return self.cache

    def blocklist_row(self, session: Any, job_id: uuid.UUID) -> bool:
        """Whether this worker has a failure record on the job (only then can it be blocked from it,
        or have a streak to end): looked up once per job, then kept by this worker's own failures."""
        return self._blocklist_rows.remember(job_id, lambda: has_record(session, job_id, self.name))

    def remember_blocklist_row(self, job_id: uuid.UUID) -> None:
        """This worker just recorded a failure on the job."""
        self._blocklist_rows.put(job_id, True)

    def outlast(self, step: Any, what: str, check: Any = None, landed: Any = None) -> Any:
        """``step()`` retried through database, broker and object-store outages for at most
        ``worker.service_wait_s`` (see :func:`farm.outages.ride_out`)."""
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
                log.warning("worker %s: closing %s failed: %s", self.name, what, describe_error(exc))
            else:
                if done:
                    released.append(done)

        if self.current_shard is not None:  # a cold shutdown: that render ends with the process
            log.warning("worker %s: closing its resources while shard %s runs", self.name, self.current_shard)
        step("threads", self._close_held)
        step("metrics server", self._close_metrics)
        step("component cache", lambda: self._close_cache("components", "component"))
        step("model cache", lambda: self._close_cache("cache", "model"))
        step("host model cache", lambda: self.models.close() if self.models is not None else None)
        step("job memo", self._close_memo)
        step("memory", self._release_memory)
        step("object store", self._close_store)
        step("database engine", self._close_engine)
        log.info("worker resources closed: %s: %s", self.name, "; ".join(released) or "nothing was open")

    def _close_held(self) -> str | None:
        names, self._held_names = self._held_names, []
        self._held.close()
        if not names:
            return None
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        return f"{listed} stopped"

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
