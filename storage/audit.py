"""Reading the audit log (``audit_event``; rows are written by :func:`storage.identity.record_audit`):
newest first, filtered by who, what and on what, a page at a time."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import AuditEvent

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
