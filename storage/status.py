"""Status values for jobs, shards and workers, and users' roles. Which status changes are allowed
lives in ``transitions``; what each role may do lives in ``access``."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    PENDING = "pending"  # submitted, not yet split into shards
    RUNNING = "running"  # shards exist; some are not terminal
    SUCCEEDED = "succeeded"  # every shard succeeded
    PARTIAL = "partial"  # every shard ended, some succeeded and some failed
    FAILED = "failed"  # no shard succeeded (or scheduling failed)
    CANCELLED = "cancelled"


class ShardStatus(StrEnum):
    PENDING = "pending"  # row exists, message not yet on the broker
    QUEUED = "queued"  # on the broker, waiting for a worker (also after a retryable failure)
    RUNNING = "running"  # claimed by a worker under a lease
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkerStatus(StrEnum):
    ONLINE = "online"
    LOST = "lost"  # silent past the heartbeat timeout
    STOPPED = "stopped"  # shut down cleanly
    DRAINING = "draining"  # stopping (SIGTERM): takes no work, its shard hands back after the current item


class ServiceClass(StrEnum):
    """Which work goes first on a queue: interactive jobs before bulk ones (a bulk run's jobs);
    an admin may move a job to the other class."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


class DependencyMode(StrEnum):
    """How a job waits for an upstream job (``after_mode``): for the whole job, or shard by shard
    (shard i waits for the upstream's shard i: frame-by-frame chains)."""

    JOB = "job"
    SHARD = "shard"


class DependencyPolicy(StrEnum):
    """What a dependent job does when its upstream ends partial, failed or cancelled
    (``after_policy``): keep waiting until the upstream is retried and succeeds, start anyway,
    or be cancelled."""

    WAIT = "wait"
    RUN_ANYWAY = "run_anyway"
    CANCEL = "cancel"


class Role(StrEnum):
    """What a user may do: everything (admin), submit and change their own jobs (member, or any
    job of a project they manage), or only look (viewer)."""

    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


class WebhookStatus(StrEnum):
    """Where one outbox event is: waiting for a (first or next) delivery, accepted by the
    receiver, or given up on (``webhooks.max_attempts`` / ``webhooks.max_age_s`` passed)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


JOB_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED})
SHARD_TERMINAL = frozenset({ShardStatus.SUCCEEDED, ShardStatus.FAILED, ShardStatus.CANCELLED})
JOB_ENDED_BADLY = frozenset({JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED})
