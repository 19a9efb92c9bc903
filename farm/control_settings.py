"""The control plane's settings sections: what runs next (``scheduling``, :mod:`farm.feeder`), the
reconciler (``reconcile``), demand and autoscaling (``autoscale``, :mod:`farm.demand`) and webhooks
(``webhooks``, :mod:`farm.webhook_delivery`). Part of :class:`farm.settings.FarmSettings`, which
re-exports them."""

from __future__ import annotations

from pydantic import Field, NonNegativeInt, PositiveFloat, field_validator, model_validator

from farm.families import CPU_QUEUE, FAMILIES
from farm.webhook_urls import AddressPolicy
from storage.settings import Section as _Section


class SchedulingSettings(_Section):
    """What runs next, decided in the database: the window of shards on the broker per queue, fair
    share between projects and users, quotas and preemption (:mod:`farm.feeder`)."""

    window_per_queue: int = Field(
        default=2,
        ge=1,
        le=100_000,
        description="Shards on the broker per GPU queue beyond one per live worker of that queue (queued or running).",
    )
    feed_interval_s: float = Field(
        default=30.0, gt=0, description="`farm beat` tops the windows up this often (besides every shard's end)."
    )
    half_life_s: float = Field(
        default=3600.0, gt=0, description="Fair share: GPU seconds used count half after this long."
    )
    project_weights: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="Fair-share weight per project name (JSON); `farm projects set-share` overrides; default 1.",
    )
    max_running_per_project: int = Field(
        default=0, ge=0, description="Most shards queued or running per project; 0 = no cap (per project: set-share)."
    )
    max_running_per_user: int = Field(
        default=0, ge=0, description="Most shards queued or running per user; 0 = no cap (per user: set-quota)."
    )
    max_items_per_job: int = Field(default=0, ge=0, description="Most items one job may have; 0 = no cap.")
    max_items_per_day: int = Field(
        default=0, ge=0, description="Most items one user may submit in 24 hours; 0 = no cap (per user: set-quota)."
    )
    preempt: bool = Field(
        default=True, description="A bulk shard hands back between items when interactive work waits for its queue."
    )
    preempt_queues: list[str] = Field(
        default_factory=lambda: [f"farm.gpu.{family}" for family in FAMILIES],
        description="Queues where bulk shards may be preempted (JSON).",
    )

    # What counts for one project or user: the value an administrator set in the database
    # (`farm projects set-share`, `farm users set-quota`), else these settings'. 0: no cap.
    def project_weight(self, name: str, own: float | None) -> float:
        return own if own is not None else self.project_weights.get(name, 1.0)

    def project_cap(self, own: int | None) -> int:
        return own if own is not None else self.max_running_per_project

    def user_cap(self, own: int | None) -> int:
        return own if own is not None else self.max_running_per_user

    def user_items_per_day(self, own: int | None) -> int:
        return own if own is not None else self.max_items_per_day


class ReconcileSettings(_Section):
    """The reconciler: restores progress from the database alone after any lost message or worker."""

    enabled: bool = Field(
        default=True, description="Run the reconciler in every worker that consumes farm.control and in `farm beat`."
    )
    interval_s: float = Field(default=30.0, gt=0, description="Seconds between two reconciler passes.")
    stuck_after_s: float = Field(
        default=120.0,
        gt=0,
        description="A shard waiting this long while every live worker on its queue has been idle as long, or a "
        "job still pending after this long, has lost its message: it is sent again.",
    )
    batch: int = Field(default=1000, ge=1, le=100_000, description="Most shards or jobs one pass acts on per step.")


WORK_QUEUE_NAMES = (*(f"farm.gpu.{family}" for family in FAMILIES), CPU_QUEUE)


class AutoscaleSettings(_Section):
    """Demand per work queue, each GPU queue and ``farm.cpu`` (:mod:`farm.demand`): the
    ``desired_workers`` figure of ``farm status --queues``, ``GET /v1/queues`` and the
    ``farm_queue_*`` metrics of ``farm api``'s ``/metrics`` (what an autoscaler such as KEDA follows)."""

    target_drain_s: float = Field(
        default=600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="Enough workers to render a queue's items left within this many seconds (model loads counted).",
    )
    queue_target_drain_s: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description='target_drain_s per queue (JSON), e.g. {"farm.gpu.sdxl": 1200}.',
    )
    hold_down_s: float = Field(
        default=300.0,
        ge=0,
        le=24 * 3600,
        description="Keep a queue's live workers this long after a shard last started or ended there.",
    )
    max_workers: dict[str, NonNegativeInt] = Field(
        default_factory=dict,
        description='Most workers a queue asks for (JSON), e.g. {"farm.gpu.sd15": 8}; a queue not named: no cap.',
    )
    default_seconds_per_item: float = Field(
        default=10.0, gt=0, le=3600, description="Seconds per item for a queue with no recent shard to measure."
    )
    default_load_s: float = Field(
        default=60.0, ge=0, le=3600, description="Seconds a new worker takes to load its model, before any is measured."
    )
    observe_s: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="Seconds per item and per model load are measured on shards that ended this recently.",
    )

    @field_validator("queue_target_drain_s", "max_workers")
    @classmethod
    def _known_queues(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(WORK_QUEUE_NAMES))
        if unknown:
            raise ValueError(f"unknown queue {unknown[0]!r}; known: {', '.join(WORK_QUEUE_NAMES)}")
        return value

    def target_for(self, queue: str) -> float:
        return self.queue_target_drain_s.get(queue, self.target_drain_s)


class WebhooksSettings(_Section):
    """Job webhooks: events leave from the outbox table, delivered by every worker that consumes
    farm.control (:mod:`farm.webhook_delivery`), signed with the job owner's secret."""

    enabled: bool = Field(
        default=True, description="Record job events for webhooks at submit, and deliver them from control workers."
    )
    timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="Seconds one delivery may take (connect + answer)."
    )
    max_attempts: int = Field(default=12, ge=1, le=100, description="Deliveries of one event before it is dead.")
    max_age_s: float = Field(
        default=86400.0, gt=0, description="An event not delivered this long after it happened is dead."
    )
    backoff_base_s: float = Field(
        default=5.0, gt=0, description="Wait after a failed delivery; doubles each attempt (with jitter)."
    )
    backoff_max_s: float = Field(default=3600.0, gt=0, description="Longest wait between two deliveries of an event.")
    progress_interval_s: float = Field(
        default=60.0, gt=0, description="At most one job.progress event per job this often."
    )
    poll_interval_s: float = Field(default=1.0, gt=0, le=60, description="How often a deliverer looks for due events.")
    batch: int = Field(default=50, ge=1, le=1000, description="Most events one look delivers.")
    concurrency: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Deliveries a deliverer makes at once (to different jobs); a slow receiver holds up only its own.",
    )
    claim_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="A claimed event whose deliverer died is delivered again after this long (above timeout_s).",
    )
    max_response_bytes: int = Field(
        default=4096, ge=0, le=1_048_576, description="Most bytes of a receiver's answer read (for the error shown)."
    )
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Host names and addresses or CIDRs (JSON list) a webhook may reach although private, loopback "
        "or link-local; everything else must resolve to public addresses.",
    )

    @field_validator("allow_hosts")
    @classmethod
    def _allow_list(cls, value: list[str]) -> list[str]:
        AddressPolicy.from_entries(value)  # a bad entry is named
        return value

    @property
    def policy(self) -> AddressPolicy:
        """Which addresses webhooks may reach."""
        return AddressPolicy.from_entries(self.allow_hosts)

    @model_validator(mode="after")
    def _lease_outlasts_a_delivery(self) -> WebhooksSettings:
        if self.claim_lease_s <= self.timeout_s:
            raise ValueError("webhooks.claim_lease_s must be longer than webhooks.timeout_s")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("webhooks.backoff_max_s must be at least webhooks.backoff_base_s")
        return self
