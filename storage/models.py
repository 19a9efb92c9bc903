"""SQLAlchemy models for the farm's state: ``job``, ``shard``, ``artifact``, ``worker``, ``job_worker``,
``bulk_job``, and who may use it: ``user``, ``project``, ``project_member``, ``api_token``,
``web_session``, ``audit_event``; the scheduler's ``share_usage`` and ``queue_feed``; the jobs a job
waits for, ``job_dependency``; webhooks: ``user_webhook``, ``job_webhook`` and the outbox
``webhook_event``; saved specs: ``job_template``.

Typed declarative models (``Mapped[]``). UUID keys, timezone-aware UTC timestamps on every
backend, JSON spec and params. Status columns are plain strings checked by the enums; which
changes are allowed is decided in :mod:`storage.transitions` only.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.status import (
    DependencyMode,
    DependencyPolicy,
    JobStatus,
    Role,
    ServiceClass,
    ShardStatus,
    WebhookStatus,
    WorkerStatus,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status(enum: type) -> Enum:
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Timestamped:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class User(Timestamped, Base):
    """Someone who uses the farm: a name, a role, the projects they belong to (``project_member``)
    and their API tokens. Users are disabled, not deleted: their jobs stay theirs."""

    __tablename__ = "user"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_status(Role))
    disabled_at: Mapped[datetime | None]
    password_hash: Mapped[str | None] = mapped_column(String(255))  # Argon2 (the web dashboard's login)
    max_running_shards: Mapped[int | None] = mapped_column(Integer)  # None: scheduling.max_running_per_user
    max_items_per_day: Mapped[int | None] = mapped_column(Integer)  # None: scheduling.max_items_per_day


class Project(Timestamped, Base):
    """A group of users and the jobs they submit into it; who sees what follows projects."""

    __tablename__ = "project"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    share_weight: Mapped[float | None] = mapped_column(Float)  # None: scheduling.project_weights, else 1
    max_running_shards: Mapped[int | None] = mapped_column(Integer)  # None: scheduling.max_running_per_project


class ShareUsage(Base):
    """GPU seconds (and items) a user's shards used in a project, decayed with the fair-share
    half-life: the value is as of ``as_of`` and counts half ``scheduling.half_life_s`` later."""

    __tablename__ = "share_usage"

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    items: Mapped[float] = mapped_column(Float, default=0.0)
    as_of: Mapped[datetime] = mapped_column(default=utcnow)


class QueueFeed(Base):
    """One row per GPU queue: the feeder locks it, so feeders of one queue take turns."""

    __tablename__ = "queue_feed"

    queue: Mapped[str] = mapped_column(String(64), primary_key=True)
    fed_at: Mapped[datetime | None]


class ProjectMember(Timestamped, Base):
    """A user's membership of a project; a ``manager`` may change every job of the project."""

    __tablename__ = "project_member"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), primary_key=True)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), primary_key=True)
    manager: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index(None, "project_id"),)


class ApiToken(Timestamped, Base):
    """An API token of a user. Only the SHA-256 (hex) of its secret is stored; the token itself is
    shown once, when it is made (:func:`storage.identity.create_token`)."""

    __tablename__ = "api_token"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class WebSession(Base):
    """A signed-in browser of the web dashboard: only the SHA-256 of the cookie's id is kept, with
    the form token (CSRF) that every POST of that browser must carry."""

    __tablename__ = "web_session"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class AuditEvent(Base):
    """Who did what, when, from where, and how it went (an HTTP-like status). Names and ids are
    copied, not referenced, so the record outlives the user or token; never holds a secret."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(64))  # the user's name (or the OS user, from the CLI)
    actor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    token_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    action: Mapped[str] = mapped_column(String(64))  # "job.submit", "job.cancel", "token.create", ...
    target: Mapped[str | None] = mapped_column(String(256))  # what it acted on, e.g. a job id
    remote: Mapped[str | None] = mapped_column(String(64))  # the client's address
    status: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class BulkJob(Timestamped, Base):
    """A bulk dataset render: manifest rows fed to normal jobs (one per model family and
    settings group) a window of shards at a time. ``name`` is its idempotency key: submitting the
    same name again adds only the rows it does not have yet."""

    __tablename__ = "bulk_job"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    base_spec: Mapped[dict[str, Any]]
    manifest_keys: Mapped[list[Any]] = mapped_column(default=list)  # every manifest submitted, in order
    rows_total: Mapped[int] = mapped_column(Integer, default=0)
    feed_until: Mapped[datetime | None]  # feeding stops at this time (the nightly window's end)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id"), index=True)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("project.id"), index=True)  # its jobs' too


class Job(Timestamped, Base):
    """One submitted job: its spec, its status and counts rolled up from its shards."""

    __tablename__ = "job"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(32))
    family: Mapped[str] = mapped_column(String(16))
    status: Mapped[JobStatus] = mapped_column(_status(JobStatus), default=JobStatus.PENDING)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    service_class: Mapped[ServiceClass] = mapped_column(_status(ServiceClass), default=ServiceClass.INTERACTIVE)
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    output_prefix: Mapped[str] = mapped_column(String(512))
    name: Mapped[str | None] = mapped_column(String(64))  # the spec's name: `after:` may name the job by it
    shards_total: Mapped[int] = mapped_column(Integer, default=0)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)
    shards_failed: Mapped[int] = mapped_column(Integer, default=0)
    items_total: Mapped[int] = mapped_column(Integer, default=0)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    items_failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    outputs_written_at: Mapped[datetime | None]  # manifest and contact sheet in the store (terminal jobs)
    bulk_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("bulk_job.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id"), index=True)  # who submitted it
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("project.id"), index=True)
    # the job this one re-runs (``farm rerun``); its outputs are untouched, the re-run writes its own
    parent_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("job.id", ondelete="SET NULL"), index=True)

    shards: Mapped[list[Shard]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="Shard.index"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (Index(None, "status", "created_at"), Index(None, "owner_id", "name", "created_at"))


class JobDependency(Base):
    """Job ``job_id`` starts after job ``upstream_id`` (resolved at submit from the spec's ``after``):
    for the whole job (``mode`` job) or shard by shard (``shard``: its shard i after the upstream's
    shard i); ``policy`` says what it does when the upstream ends partial, failed or cancelled.
    The feeder sends no shard whose dependency is unmet (:mod:`storage.dependencies`)."""

    __tablename__ = "job_dependency"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    upstream_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)  # its place in the spec's ``after``
    mode: Mapped[DependencyMode] = mapped_column(_status(DependencyMode), default=DependencyMode.JOB)
    policy: Mapped[DependencyPolicy] = mapped_column(_status(DependencyPolicy), default=DependencyPolicy.WAIT)

    __table_args__ = (Index(None, "upstream_id"),)


class Shard(Timestamped, Base):
    """A bounded slice of a job's items, rendered by one worker under a lease."""

    __tablename__ = "shard"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(64))
    status: Mapped[ShardStatus] = mapped_column(_status(ShardStatus), default=ShardStatus.PENDING)
    params: Mapped[dict[str, Any]]
    items_total: Mapped[int] = mapped_column(Integer, default=0)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    fencing_token: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    failed_workers: Mapped[list[Any]] = mapped_column(default=list)  # distinct names, in order of failure
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    preempt_requested_at: Mapped[datetime | None]  # interactive work waits: hand back between items

    job: Mapped[Job] = relationship(back_populates="shards")
    artifacts: Mapped[list[Artifact]] = relationship(back_populates="shard", passive_deletes=True)

    __table_args__ = (
        UniqueConstraint("job_id", "index"),
        Index(None, "job_id", "status", "index"),  # a job's next pending shards, in order
        Index(None, "status", "lease_expires_at"),
    )


class Artifact(Base):
    """One output object in the store, written by the shard attempt holding ``fencing_token``."""

    __tablename__ = "artifact"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    shard_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("shard.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(1024), unique=True)
    item_index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_hash: Mapped[str | None] = mapped_column(String(64))
    fencing_token: Mapped[int] = mapped_column(BigInteger)

    job: Mapped[Job] = relationship(back_populates="artifacts")
    shard: Mapped[Shard] = relationship(back_populates="artifacts")


class Worker(Timestamped, Base):
    """A worker process: where it runs, what it serves, and when it last spoke."""

    __tablename__ = "worker"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[list[Any]] = mapped_column(default=list)
    device: Mapped[str] = mapped_column(String(32))
    gpu_name: Mapped[str | None] = mapped_column(String(255))
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    pinned_models: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[WorkerStatus] = mapped_column(_status(WorkerStatus), default=WorkerStatus.ONLINE)
    current_shard_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    idle_since: Mapped[datetime | None]  # holding no shard since then (None while it renders)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobWorker(Timestamped, Base):
    """How one worker has fared on one job's shards: its failures in a row, and since when it is
    blocked from the job's shards (``blocked_at``), if it is."""

    __tablename__ = "job_worker"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    worker: Mapped[str] = mapped_column(String(255), primary_key=True)
    failures_in_a_row: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    successes: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    blocked_at: Mapped[datetime | None]


class UserWebhook(Timestamped, Base):
    """A user's webhook settings: the URL their jobs report to when a spec names none, and the
    secret every delivery to them is signed with (HMAC-SHA256). The secret is kept as it is, not
    hashed: the farm must sign with it, which a hash cannot do. It is shown once, when made."""

    __tablename__ = "user_webhook"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str | None] = mapped_column(String(2048))
    secret: Mapped[str | None] = mapped_column(String(128))
    secret_created_at: Mapped[datetime | None]


class JobWebhook(Base):
    """Where a job's events go, fixed at submit (the spec's webhook, else its owner's URL), which
    events, and the ``job.progress`` throttle: at most one per ``progress_interval_s``."""

    __tablename__ = "job_webhook"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any]] = mapped_column(default=list)
    progress_interval_s: Mapped[float] = mapped_column(Float)
    last_progress_at: Mapped[datetime | None]
    last_progress_items: Mapped[int] = mapped_column(Integer, default=0)


class WebhookEvent(Base):
    """The outbox: one event of a job to deliver, written in the transaction of the change it
    reports. ``id`` is the event's identity for the receiver (the same on every attempt);
    ``seq`` orders a job's events. A claimed event's ``next_attempt_at`` is its claim's expiry."""

    __tablename__ = "webhook_event"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]]
    status: Mapped[WebhookStatus] = mapped_column(_status(WebhookStatus), default=WebhookStatus.PENDING)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_http_status: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (Index(None, "status", "next_attempt_at"), Index(None, "job_id", "seq"))


class JobTemplate(Timestamped, Base):
    """A saved job spec (``farm templates save``), a full valid spec as written (inputs already in
    the store), that jobs are submitted from with overrides. Named uniquely within its project:
    the project's members use it, its owner and the project's managers change it."""

    __tablename__ = "job_template"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]]
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id"), index=True)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))

    __table_args__ = (UniqueConstraint("project_id", "name"),)


metadata = Base.metadata
