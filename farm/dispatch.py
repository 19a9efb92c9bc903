"""Publishing farm messages. Tasks are sent by name, so publishers (client, scheduler) never
import the task modules or anything heavy; arguments are named, plain JSON (ids as strings), so
Flower shows them as ``job_id``, ``shard_id``. Each message also carries a line for people as its
``argsrepr`` (the tasks take no positional arguments), which Flower shows as the task's args and
searches: ``job=3f2a91c0 shard=2 sd15 text_to_image`` (job id, shard index, family, kind) for a
shard, ``job=3f2a91c0`` for the control tasks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from farm.celery_app import CONTROL_QUEUE, MAX_PRIORITY
from farm.scheduler import ShardDispatch
from farm.sharding import QUEUES
from storage.chunking import chunked
from storage.models import Job, Shard
from storage.status import ServiceClass

if TYPE_CHECKING:
    from celery import Celery

    from farm.scheduler import ShardDispatch

SCHEDULE_JOB = "farm.schedule_job"
RENDER_SHARD = "farm.render_shard"
FINALIZE_JOB = "farm.finalize_job"


SHORT_ID = 8  # hex digits of a job id shown to people


@dataclass(frozen=True)
class ShardLabel:
    """What a person looking for a shard in Flower knows it by."""

    index: int
    kind: str
    family: str


def shard_labels(session: Any, shard_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, ShardLabel]:
    """The labels of these shards (one query per 1,000)."""
    labels: dict[uuid.UUID, ShardLabel] = {}
    for ids in chunked(shard_ids):  # below the driver's parameter limit, however many
        query = select(Shard.id, Shard.index, Job.kind, Job.family).join(Job, Job.id == Shard.job_id)
        rows = session.execute(query.where(Shard.id.in_(ids)))
        labels.update({row.id: ShardLabel(row.index, row.kind, row.family) for row in rows})
    return labels


def class_priority(app: Celery, service_class: str) -> int:
    """The message priority that puts interactive shards ahead of bulk ones already on the broker:
    on AMQP a higher number goes first, on Redis (kombu's priority sub-queues) a lower one. The
    order between jobs is decided by the feeder (:mod:`farm.fair_share`), not by the broker."""
    urgent = service_class == ServiceClass.INTERACTIVE
    if str(app.conf.broker_url or "").startswith(("redis://", "rediss://")):
        return 0 if urgent else MAX_PRIORITY
    return MAX_PRIORITY if urgent else 0


def shard_route(app: Celery, session: Any, shard_id: uuid.UUID) -> dict[str, Any]:
    """How to send the shard again: its queue, its class's message priority and its label for
    Flower (the keyword arguments of :func:`publish_shard`)."""
    row = session.execute(
        select(Shard.queue, Shard.index, Job.service_class, Job.kind, Job.family)
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.id == shard_id)
    ).one()
    return {
        "queue": row.queue,
        "priority": class_priority(app, row.service_class),
        "label": ShardLabel(row.index, row.kind, row.family),
    }


def job_argsrepr(job_id: uuid.UUID | str) -> str:
    return f"job={str(job_id)[:SHORT_ID]}"


def shard_argsrepr(job_id: uuid.UUID | str, queue: str, label: ShardLabel | None) -> str:
    """``job=3f2a91c0 shard=2 sd15 text_to_image`` (short enough for Flower's args column); without
    a label, the family its queue says: ``job=3f2a91c0 sd15``."""
    if label is not None:
        return f"{job_argsrepr(job_id)} shard={label.index} {label.family} {label.kind}"
    family = next((f for f, q in QUEUES.items() if q == queue), None)
    return f"{job_argsrepr(job_id)} {family or queue}"


def publish_schedule(app: Celery, job_id: uuid.UUID) -> None:
    app.send_task(SCHEDULE_JOB, kwargs={"job_id": str(job_id)}, queue=CONTROL_QUEUE, argsrepr=job_argsrepr(job_id))


def publish_finalize(app: Celery, job_id: uuid.UUID) -> None:
    app.send_task(FINALIZE_JOB, kwargs={"job_id": str(job_id)}, queue=CONTROL_QUEUE, argsrepr=job_argsrepr(job_id))


def publish_shard(
    app: Celery,
    shard_id: uuid.UUID,
    job_id: uuid.UUID,
    queue: str,
    priority: int = 0,
    countdown: float | None = None,
    producer: Any = None,
    label: ShardLabel | None = None,
) -> None:
    app.send_task(
        RENDER_SHARD,
        kwargs={"shard_id": str(shard_id), "job_id": str(job_id), "sent_at": time.time()},
        queue=queue,
        priority=priority,
        countdown=countdown,
        producer=producer,
        argsrepr=shard_argsrepr(job_id, queue, label),
    )


def publish_shards(
    app: Celery,
    dispatches: Iterable[ShardDispatch],
    producer: Any = None,
    labels: Mapping[uuid.UUID, ShardLabel] | None = None,
) -> list[uuid.UUID]:
    """One message per shard (on ``producer``'s connection when given), labelled from ``labels``
    (:func:`shard_labels`) when given; returns their ids."""
    sent = []
    labels = labels or {}
    for d in dispatches:
        publish_shard(app, d.shard_id, d.job_id, d.queue, d.priority, producer=producer, label=labels.get(d.shard_id))
        sent.append(d.shard_id)
    return sent
