"""Reading the audit log (``audit_event``; rows are written by :func:`storage.identity.record_audit`):
newest first, filtered by who, what and on what, a page at a time; and the submission rate of a
token, counted from it (:func:`submit_wait`)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import AuditEvent, utcnow

SUBMIT_ACTIONS = ("job.submit", "job.rerun", "bulk.submit")
RATE_REFUSED = 429  # a submission refused for the rate is not counted against it

MAX_PAGE = 500


def list_audit(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Audit rows as plain data, newest first. ``action`` may end with ``*`` (``job.*``);
    ``before_id``: the id of the last row of the previous page."""
    query = select(AuditEvent)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        if action.endswith("*"):
            query = query.where(AuditEvent.action.startswith(action[:-1], autoescape=True))
        else:
            query = query.where(AuditEvent.action == action)
    if target:
        query = query.where(AuditEvent.target == target)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    rows = session.scalars(query.order_by(AuditEvent.id.desc()).limit(max(1, min(limit, MAX_PAGE))))
    return [
        {
            "id": row.id,
            "at": row.at.isoformat(),
            "actor": row.actor,
            "action": row.action,
            "target": row.target,
            "remote": row.remote,
            "status": row.status,
            "detail": row.detail or {},
        }
        for row in rows
    ]


def submit_wait(
    session: Session,
    token_id: uuid.UUID | None,
    user_id: uuid.UUID,
    per_minute: int,
    now: datetime | None = None,
) -> float | None:
    """Seconds until the token (or, for a dashboard session, the user's own submissions without
    a token) may submit again, at most ``per_minute`` submissions in any minute; ``None``: now.
    Counted from the audit rows of the last minute, so every API process applies one limit."""
    now = now or utcnow()
    whose = AuditEvent.token_id == token_id if token_id is not None else AuditEvent.actor_id == user_id
    times = session.scalars(
        select(AuditEvent.at)
        .where(
            whose,
            AuditEvent.action.in_(SUBMIT_ACTIONS),
            AuditEvent.status != RATE_REFUSED,
            AuditEvent.at > now - timedelta(minutes=1),
        )
        .order_by(AuditEvent.at.desc())
        .limit(per_minute)
    ).all()
    if len(times) < per_minute:
        return None
    return max(0.1, (times[-1] + timedelta(minutes=1) - now).total_seconds())
