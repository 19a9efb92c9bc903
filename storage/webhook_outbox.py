"""The webhook outbox: job events written in the transaction of the change they report, claimed
and settled by the deliverer (:mod:`farm.webhook_delivery`), and read back for ``farm status``.

A job has a webhook when a ``job_webhook`` row names its URL (written at submit). Its status
changes (:func:`storage.transitions.set_job_status`) and its roll-ups
(:func:`storage.transitions.refresh_job_counts`, throttled) add ``webhook_event`` rows here.
Delivery is at least once: a claim moves the event's ``next_attempt_at`` to the claim's expiry, so
an event whose deliverer died is claimed again; a job's events go out in order (an event waits
while an earlier one of its job is pending). Users' signing secrets live in ``user_webhook``.
Functions take a session and never commit.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session, aliased

from storage.errors import NotFound
from storage.models import BulkJob, Job, JobWebhook, User, UserWebhook, WebhookEvent, utcnow
from storage.status import JOB_TERMINAL, JobStatus, WebhookStatus

W = WebhookStatus
STARTED, PROGRESS = "job.started", "job.progress"
EVENT_TYPES = (STARTED, PROGRESS, "job.succeeded", "job.partial", "job.failed", "job.cancelled")
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
MAX_ERROR_CHARS = 500


def status_event(status: JobStatus) -> str | None:
    """The event a job's move to ``status`` reports: ``job.started`` for running (a retry runs
    again), ``job.<status>`` for an end; none for pending."""
    if status == JobStatus.RUNNING:
        return STARTED
    return f"job.{JobStatus(status).value}" if status in JOB_TERMINAL else None


# -- writing events -----------------------------------------------------------------------------
def attach_webhook(
    session: Session, job_id: uuid.UUID, url: str, events: list[str], progress_interval_s: float
) -> None:
    """Give a new job its webhook (``events``: the types sent; every one when empty)."""
    session.add(JobWebhook(job_id=job_id, url=url, events=list(events), progress_interval_s=progress_interval_s))
    session.flush()


def _webhook(session: Session, job_id: uuid.UUID, event: str) -> JobWebhook | None:
    hook = session.get(JobWebhook, job_id)
    if hook is None or (hook.events and event not in hook.events):
        return None
    return hook


def job_payload(session: Session, job_id: uuid.UUID) -> dict[str, Any]:
    """The job as an event's body reports it, read from the table (not the session's objects:
    the status change was a Core ``UPDATE``)."""
    row = session.execute(
        select(
            Job.id,
            Job.status,
            Job.kind,
            Job.family,
            Job.output_prefix,
            Job.shards_total,
            Job.shards_done,
            Job.shards_failed,
            Job.items_total,
            Job.items_done,
            Job.items_failed,
            Job.error,
            Job.created_at,
            Job.started_at,
            Job.finished_at,
            BulkJob.name.label("bulk"),
        )
        .outerjoin(BulkJob, BulkJob.id == Job.bulk_id)
        .where(Job.id == job_id)
    ).one()

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": str(row.id),
        "status": JobStatus(row.status).value,
        "kind": row.kind,
        "family": row.family,
        "output_prefix": f"{row.output_prefix}/{row.id}",
        "shards": {"total": row.shards_total, "done": row.shards_done, "failed": row.shards_failed},
        "items": {"total": row.items_total, "done": row.items_done, "failed": row.items_failed},
        "error": row.error,
        "created_at": when(row.created_at),
        "started_at": when(row.started_at),
        "finished_at": when(row.finished_at),
        "bulk": row.bulk,  # the bulk run's name for a job of one, else null
    }


def _add_event(session: Session, hook: JobWebhook, event: str, now: datetime) -> uuid.UUID:
    event_id = uuid.uuid4()
    payload = {
        "id": str(event_id),
        "type": event,
        "created_at": now.isoformat(),
        "job": job_payload(session, hook.job_id),
    }
    session.add(
        WebhookEvent(
            id=event_id,
            job_id=hook.job_id,
            type=event,
            url=hook.url,
            payload=payload,
            created_at=now,
            next_attempt_at=now,
        )
    )
    session.flush()
    return event_id


def record_status_event(session: Session, job_id: uuid.UUID, status: JobStatus) -> uuid.UUID | None:
    """Add the event of the job's move to ``status`` when the job has a webhook that wants it;
    returns its id."""
    event = status_event(status)
    hook = _webhook(session, job_id, event) if event else None
    if hook is None or event is None:
        return None
    return _add_event(session, hook, event, utcnow())


def record_progress_event(session: Session, job_id: uuid.UUID, items_done: int) -> uuid.UUID | None:
    """Add a ``job.progress`` event when the job has a webhook that wants it, more items are done
    than it last reported, and its last one is ``progress_interval_s`` old (a guarded update: one
    caller per interval wins)."""
    hook = _webhook(session, job_id, PROGRESS)
    if hook is None or items_done <= hook.last_progress_items:
        return None
    now = utcnow()
    c = JobWebhook.__table__.c
    due = now - timedelta(seconds=hook.progress_interval_s)
    won = session.execute(
        update(JobWebhook.__table__)
        .where(c.job_id == job_id, (c.last_progress_at.is_(None)) | (c.last_progress_at <= due))
        .values(last_progress_at=now, last_progress_items=items_done)
    )
    if won.rowcount != 1:
        return None
    session.expire(hook)
    return _add_event(session, hook, PROGRESS, now)


# -- delivering them ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimedEvent:
    """An event claimed for one delivery attempt (``attempt``: its number, the claim's fence)."""

    seq: int
    id: uuid.UUID
    job_id: uuid.UUID
    type: str
    url: str
    payload: dict[str, Any]
    attempt: int
    created_at: datetime
    secret: str | None


def claim_due(session: Session, now: datetime, limit: int, lease_s: float) -> list[ClaimedEvent]:
    """Claim up to ``limit`` pending events whose time has come, the oldest first, at most one per
    job (the earliest pending one: a job's events go out in order). Each claimed event's attempt
    is counted and its ``next_attempt_at`` moves ``lease_s`` ahead: a deliverer that dies holding
    it leaves it to be claimed again then. ``FOR UPDATE SKIP LOCKED`` lets deliverers in several
    processes share the table (SQLite serializes writers anyway)."""
    earlier = aliased(WebhookEvent)
    earlier_pending = exists().where(
        and_(earlier.job_id == WebhookEvent.job_id, earlier.seq < WebhookEvent.seq, earlier.status == W.PENDING)
    )
    rows = session.scalars(
        select(WebhookEvent)
        .where(WebhookEvent.status == W.PENDING, WebhookEvent.next_attempt_at <= now, ~earlier_pending)
        .order_by(WebhookEvent.next_attempt_at, WebhookEvent.seq)
        .limit(limit)
        .with_for_update(skip_locked=True, of=WebhookEvent)
    ).all()
    if not rows:
        return []
    owners = dict(session.execute(select(Job.id, Job.owner_id).where(Job.id.in_({r.job_id for r in rows}))).all())
    keys = dict(
        session.execute(
            select(UserWebhook.user_id, UserWebhook.secret).where(UserWebhook.user_id.in_(set(owners.values())))
        ).all()
    )
    claimed = []
    for row in rows:
        row.attempts += 1
        row.next_attempt_at = now + timedelta(seconds=lease_s)
        secret = keys.get(owners.get(row.job_id))
        claimed.append(
            ClaimedEvent(
                row.seq, row.id, row.job_id, row.type, row.url, dict(row.payload), row.attempts, row.created_at, secret
            )
        )
    session.flush()
    return claimed


def _settle(session: Session, event: ClaimedEvent, **values: Any) -> bool:
    """Write an attempt's outcome if the event is still the attempt's (pending, not claimed
    again since): whether it was written."""
    result = session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.seq == event.seq, WebhookEvent.status == W.PENDING, WebhookEvent.attempts == event.attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def mark_delivered(session: Session, event: ClaimedEvent, http_status: int, now: datetime) -> bool:
    return _settle(session, event, status=W.DELIVERED, delivered_at=now, last_http_status=http_status, last_error=None)


def mark_failed(
    session: Session, event: ClaimedEvent, error: str, http_status: int | None, retry_at: datetime | None
) -> bool:
    """A failed attempt: tried again at ``retry_at``, or given up on (``dead``) when it is None."""
    values: dict[str, Any] = {"last_error": error[:MAX_ERROR_CHARS], "last_http_status": http_status}
    if retry_at is None:
        values["status"] = W.DEAD
    else:
        values["next_attempt_at"] = retry_at
    return _settle(session, event, **values)


def job_deliveries(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every event of a job, in order, with how its delivery goes (never the secret)."""
    rows = session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id).order_by(WebhookEvent.seq)).all()

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return [
        {
            "id": str(r.id),
            "event": r.type,
            "status": WebhookStatus(r.status).value,
            "attempts": r.attempts,
            "last_http_status": r.last_http_status,
            "last_error": r.last_error,
            "created_at": when(r.created_at),
            "next_attempt_at": when(r.next_attempt_at) if r.status == W.PENDING else None,
            "delivered_at": when(r.delivered_at),
        }
        for r in rows
    ]


# -- users' URLs and secrets -------------------------------------------------------------------
def _user_id(session: Session, name: str) -> uuid.UUID:
    user_id = session.scalar(select(User.id).where(User.name == name))
    if user_id is None:
        raise NotFound(f"no user {name!r}")
    return user_id


def _user_row(session: Session, user_id: uuid.UUID) -> UserWebhook:
    row = session.get(UserWebhook, user_id, with_for_update=True)
    if row is None:
        row = UserWebhook(user_id=user_id)
        session.add(row)
        session.flush()
    return row


def user_webhook(session: Session, user_id: uuid.UUID) -> tuple[str | None, bool]:
    """``(default URL, has a secret)`` of a user."""
    row = session.get(UserWebhook, user_id)
    return (row.url, row.secret is not None) if row is not None else (None, False)


def set_user_webhook_url(session: Session, user_id: uuid.UUID, url: str | None) -> str | None:
    """Set (or with None clear) the user's default webhook URL, checked by the caller. Returns a
    new signing secret when the user had none (to show once), else None."""
    row = _user_row(session, user_id)
    row.url = url
    made = None
    if row.secret is None and url is not None:
        made = _new_secret(row)
    session.flush()
    return made


def rotate_webhook_secret(session: Session, user_id: uuid.UUID) -> str:
    """Make a new signing secret for the user (the old one stops at once); returned to show once."""
    row = _user_row(session, user_id)
    secret = _new_secret(row)
    session.flush()
    return secret


def _new_secret(row: UserWebhook) -> str:
    row.secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    row.secret_created_at = utcnow()
    return row.secret


def user_id_by_name(session: Session, name: str) -> uuid.UUID:
    return _user_id(session, name)
