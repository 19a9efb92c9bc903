"""Typed settings for every part of the farm.

One :class:`FarmSettings` object, read from ``FARM_*`` environment variables (nested sections use
``__``: ``FARM_DB__URL``, ``FARM_STORAGE__S3__BUCKET``) and optionally a ``.env`` file. It is
created in entry points only (CLI, worker start, tests) and passed down; nothing reads the
environment at import time.

The defaults are the *embedded mode*: SQLite, a local object folder and the kombu filesystem
broker, all under ``./farm-data/``. Outside that mode, placeholder secrets are refused.

Storage's sections (:class:`DatabaseSettings`, :class:`StorageSettings` with its
:class:`~storage.settings.S3Settings`) are defined in :mod:`storage.settings`, and
:func:`redact_url` in :mod:`storage.urls` (storage imports nothing from ``farm``); they are
imported here, so ``from farm.settings import redact_url`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from farm.control_settings import (
    AutoscaleSettings,
    ReconcileSettings,
    SchedulingSettings,
    WebhooksSettings,
)
from farm.errors import ConfigError
from storage.settings import DatabaseSettings, StorageSettings
from storage.settings import Section as _Section
from storage.urls import redact_url

# Values that appear in example files and tutorials; a real deployment must replace them.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "change-me", "change_me", "placeholder", "secret", "password", "minioadmin", "xxx", "todo"}
)


class BrokerSettings(_Section):
    """The Celery broker that carries scheduling and shard messages."""

    url: str = Field(
        default="filesystem://",
        description="Broker URL: redis://host:6379/0, amqp://user:pass@host:5672//, or filesystem://",
    )
    result_backend: str | None = Field(
        default=None,
        description="Celery result backend. Default: redis for a redis broker, a file:// folder "
        "in the embedded mode, none for RabbitMQ (state lives in our own tables).",
    )
    visibility_timeout: int = Field(
        default=4 * 3600,
        ge=5,
        description="Redis only: seconds before an unacknowledged message is redelivered. "
        "Set above your longest shard; the database lease covers the rest.",
    )
    consumer_timeout_s: float | None = Field(
        default=1800.0,
        gt=0,
        description="RabbitMQ only: the server's consumer_timeout (30 min unless rabbitmq.conf says otherwise). "
        "A worker hands a longer shard back between items, keeping the items done, before the server would "
        "close its channel; empty = never.",
    )
    heartbeat_s: float = Field(
        default=120.0,
        ge=0,
        description="RabbitMQ only: the AMQP heartbeat interval a worker asks for (the smaller of this and the "
        "server's, 60 s by default, is used); kept up while a shard renders. 0 = no heartbeats.",
    )


class WorkerSettings(_Section):
    """How a worker process runs shards."""

    queues: list[str] = Field(
        default_factory=lambda: ["farm.gpu.sd15", "farm.gpu.sdxl", "farm.gpu.svd"],
        description="Queues this worker consumes.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda when available.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto = float16 on cuda, float32 on cpu."
    )
    model_cache_mb: int = Field(default=24_000, ge=1, description="Memory budget for pinned models (LRU).")
    lora_cache_size: int = Field(
        default=8,
        ge=1,
        le=64,
        description="LoRA adapters kept loaded per pinned model (LRU; a job's whole stack is always kept).",
    )
    component_cache_mb: int = Field(
        default=8_000,
        ge=1,
        description="Memory budget for pinned components: IP-Adapters, image encoders, ControlNets, face "
        "analysis (LRU).",
    )
    lease_seconds: int = Field(
        default=120, ge=5, description="A shard lease expires this long after the last heartbeat."
    )
    heartbeat_seconds: float = Field(default=15.0, gt=0, description="How often a running shard renews its lease.")
    progress_interval_s: float = Field(
        default=1.0, ge=0, description="At most one progress write per shard per interval."
    )
    rollup_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="A running job's counts are rolled up at most once per interval (and when it ends).",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts per shard before a retryable failure is final."
    )
    fail_shards: list[int] = Field(
        default_factory=list,
        description="Fault drills only: shard indexes this worker fails on purpose (non-retryable).",
    )
    fail_shards_retryable: bool = Field(
        default=False, description="Fault drills only: make the fail_shards faults retryable (a broken worker)."
    )
    slow_shards: list[int] = Field(
        default_factory=list,
        description="Fault drills only: shard indexes this worker holds for slow_shards_s before rendering "
        "(a slow GPU; cancellation and lease loss still stop it).",
    )
    slow_shards_s: float = Field(
        default=60.0, ge=0, description="Fault drills only: how long each of the slow_shards is held, in seconds."
    )
    service_wait_s: float = Field(
        default=900.0,
        gt=0,
        description="How long a worker waits, with backoff, for a restarting database, broker or object store "
        "before it gives a task back to the queue.",
    )
    lost_after_s: float = Field(
        default=60.0, gt=0, description="A worker silent this long is shown as lost and its shard leases expire."
    )
    drain_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="On SIGTERM a worker drains: it takes no new shard, hands its shard back after the item in "
        "progress (or finishes it on its last item) and exits 0 within this many seconds, else it stops anyway "
        "and exits 1 (the shard is re-run after its lease). Keep it above the longest item, and the container's "
        "grace period (Kubernetes terminationGracePeriodSeconds, compose stop_grace_period) above it.",
    )
    blocklist_after: int = Field(
        default=3,
        ge=0,
        description="A worker that fails this many shards of one job in a row stops taking that job's "
        "shards (0 = never).",
    )
    max_workers_per_shard: int = Field(
        default=3, ge=1, le=20, description="A shard that has failed on this many different workers fails for good."
    )
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="Prometheus metrics port; empty = off.")
    metrics_address: str = Field(
        default="127.0.0.1", description="Address the metrics port binds to (0.0.0.0 to let Prometheus scrape it)."
    )
    model_dir: Path | None = Field(
        default=None,
        description="This host's cache of registry models (shared by its workers); empty = <data_dir>/model-cache.",
    )
    prefetch_models: list[str] = Field(
        default_factory=list,
        description="Registry models `farm models prefetch` warms when given no names (JSON list; compose init).",
    )
    model_disk_gb: float = Field(
        default=200.0,
        gt=0,
        description="Disk budget of the registry model cache: least recently used models not in use are removed "
        "beyond it.",
    )
    face_models_dir: Path | None = Field(
        default=None,
        description="insightface pack (antelopev2 layout) for InstantID; empty = <data_dir>/models/antelopev2.",
    )
    onnx_providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="ONNX Runtime providers for face analysis: auto = CUDA when available."
    )


class PackageStep(_Section):
    """A dataset package a nightly bulk render writes (or extends) when its window ends."""

    format: Literal["webdataset", "parquet", "files"] = Field(description="webdataset, parquet or files.")
    shard_size: int = Field(default=1000, ge=1, le=1_000_000, description="Samples per shard.")
    out: str | None = Field(
        default=None,
        description="store:<prefix> in the bucket or a folder on the control host; empty = "
        "store:packages/<name>/<format>.",
    )


class BulkSchedule(_Section):
    """One nightly bulk render started by ``farm beat``."""

    name: str = Field(description="The bulk job's name (its idempotency key: each night adds only new rows).")
    base: Path = Field(description="Base job spec file (YAML/JSON) the manifest rows apply to.")
    manifest: str = Field(description="Manifest: a local JSONL/CSV path, or store:<key> in the bucket.")
    at: str = Field(default="01:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="Start time, HH:MM.")
    timezone: str = Field(default="UTC", description="IANA time zone of `at` and `window_end`.")
    window_end: str | None = Field(
        default=None,
        pattern=r"^([01]\d|2[0-3]):[0-5]\d$",
        description="HH:MM after which feeding stops (the job stays resumable); empty = no end.",
    )
    package: list[PackageStep] = Field(
        default_factory=list,
        description="Dataset packages `farm beat` extends at `window_end` with the rows rendered since "
        "(`farm bulk package`); needs `window_end`.",
    )

    @model_validator(mode="after")
    def _package_needs_an_end(self) -> BulkSchedule:
        if self.package and not self.window_end:
            raise ValueError(f"bulk schedule {self.name!r}: package needs window_end (when to package)")
        return self


class BulkSettings(_Section):
    """Bulk dataset renders: nightly schedules (their shards are fed like every job's, see
    :class:`SchedulingSettings`)."""

    schedules: list[BulkSchedule] = Field(
        default_factory=list, description="Nightly bulk renders for `farm beat` (JSON list)."
    )


class FlowerSettings(_Section):
    """``farm flower``: Celery's monitoring UI for the farm's app."""

    address: str = Field(default="127.0.0.1", description="Address Flower listens on.")
    port: int = Field(default=5555, ge=1, le=65535, description="Flower's HTTP port.")
    user: str | None = Field(default=None, description="Basic-auth user; required outside the embedded mode.")
    password: SecretStr | None = Field(default=None, description="Basic-auth password; never logged.")


class ApiSettings(_Section):
    """``farm api``, the front door (its server side), and where a client finds it (``url`` and
    ``token``: with both set, the client and the job commands go through the API and need no
    database, broker or bucket settings)."""

    url: str | None = Field(default=None, description="Client side: the farm API's URL, e.g. https://farm.example.com.")
    token: SecretStr | None = Field(default=None, description="Client side: your API token (`farm tokens create`).")
    address: str = Field(default="127.0.0.1", description="Address `farm api` listens on.")
    port: int = Field(default=8700, ge=1, le=65535, description="Port `farm api` listens on.")
    public_url: str | None = Field(
        default=None, description="The URL people reach the API at (download links); default http://ADDRESS:PORT."
    )
    max_body_mb: float = Field(default=40.0, gt=0, le=1024, description="Largest request body accepted (MiB).")
    submit_per_minute: int = Field(
        default=120, ge=1, description="Submissions one token may make per minute (bulk submits included)."
    )
    member_max_priority: int = Field(
        default=5, ge=0, le=9, description="Highest job priority a member may set; admins may set up to 9."
    )
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; empty = CORS off.")
    events_poll_s: float = Field(
        default=0.5, gt=0, le=60, description="How often a job's event stream looks for progress."
    )

    @property
    def client_mode(self) -> bool:
        """Whether a client goes through the API (both ``url`` and ``token`` are set)."""
        return bool(self.url) and self.token is not None


class FarmSettings(BaseSettings):
    """All settings. Build with ``FarmSettings()`` in an entry point and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="FARM_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_assignment=True,
    )

    data_dir: Path = Field(default=Path("farm-data"), description="Folder for every embedded-mode file.")
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    bulk: BulkSettings = Field(default_factory=BulkSettings)
    scheduling: SchedulingSettings = Field(default_factory=SchedulingSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    autoscale: AutoscaleSettings = Field(default_factory=AutoscaleSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    webhooks: WebhooksSettings = Field(default_factory=WebhooksSettings)

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> FarmSettings:
        if self.embedded:
            return self
        for name, value in self._secrets():
            if value.strip().lower() in PLACEHOLDER_SECRETS:
                raise ConfigError(
                    f"{name} is a placeholder secret; set a real one (placeholders are only "
                    "accepted in the embedded mode)"
                )
        return self

    def _secrets(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for name, url in (
            ("db.url", self.db.url),
            ("broker.url", self.broker.url),
            ("broker.result_backend", self.broker.result_backend),
        ):
            password = urlsplit(url).password if url else None
            if password is not None:
                found.append((f"{name} password", password))
        s3 = self.storage.s3
        if s3.secret_access_key is not None:
            found.append(("storage.s3.secret_access_key", s3.secret_access_key.get_secret_value()))
        if self.flower.password is not None:
            found.append(("flower.password", self.flower.password.get_secret_value()))
        if self.api.token is not None:
            found.append(("api.token", self.api.token.get_secret_value()))
        return found

    # -- derived values -------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True when nothing points at a server: SQLite, local objects, filesystem broker."""
        return (
            self.database_url.startswith("sqlite")
            and self.storage.backend == "local"
            and self.broker.url.startswith("filesystem://")
        )

    @property
    def database_url(self) -> str:
        if self.db.url:
            return self.db.url
        return f"sqlite:///{(self.data_dir / 'farm.db').as_posix()}"

    @property
    def local_store_root(self) -> Path:
        return self.storage.local_folder(self.data_dir)

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def model_dir(self) -> Path:
        return self.worker.model_dir or self.data_dir / "model-cache"

    @property
    def face_models_dir(self) -> Path:
        return self.worker.face_models_dir or self.data_dir / "models" / "antelopev2"


def load_settings(**overrides: object) -> FarmSettings:
    """Build settings from the environment (plus overrides), turning validation errors into a
    :class:`ConfigError` that names each bad field."""
    from pydantic import ValidationError

    try:
        return FarmSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None


def _describe(err: dict) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {message}" if where else message


@dataclass(frozen=True)
class SettingRow:
    """One leaf setting, for ``farm config show`` and the README table."""

    env_var: str
    default: str
    current: str
    description: str


def setting_rows(settings: FarmSettings) -> list[SettingRow]:
    """Every leaf setting in declaration order, with secrets and URL passwords hidden."""
    rows: list[SettingRow] = []

    def walk(model: BaseModel, path: list[str]) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, [*path, name])
                continue
            default = field.get_default(call_default_factory=True)
            rows.append(
                SettingRow(
                    env_var="FARM_" + "__".join(p.upper() for p in [*path, name]),
                    default=_show(default),
                    current=_show(value),
                    description=field.description or "",
                )
            )

    walk(settings, [])
    return rows


def _show(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, str) and "://" in value:
        return redact_url(value) or ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
