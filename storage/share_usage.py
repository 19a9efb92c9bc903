"""The scheduler's tables: the fair-share ledger (``share_usage``) and the feeder's queue locks
(``queue_feed``).

The ledger holds, per project and user, the GPU seconds and items their shards used, decayed
with a half-life: a value written at ``as_of`` counts half one half-life later. A worker charges
each shard's render time when the shard's attempt ends (:func:`charge_usage`); the feeder reads
the whole ledger (one row per user and project that rendered) to order what goes next
(:func:`read_usage`). Administrators set projects' weights and caps and users' caps here too
(:func:`set_project_share`, :func:`set_user_quota`). Callers own the transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.errors import NotFound, UserError
from storage.models import Job, Project, ProjectMember, QueueFeed, Shard, ShareUsage, User, utcnow
from storage.status import ShardStatus


def decayed(value: float, as_of: datetime, now: datetime, half_life_s: float) -> float:
    """``value`` written at ``as_of``, as it counts at ``now``."""
    age = max(0.0, (now - as_of).total_seconds())
    return value * 0.5 ** (age / half_life_s)


@dataclass(frozen=True)
class Usage:
    """GPU seconds and items used (decayed to the time it was read)."""

    gpu_seconds: float
    items: float


def charge_usage(
    session: Session,
    project_id: uuid.UUID,
    user_id: uuid.UUID,
    seconds: float,
    items: int,
    half_life_s: float,
    now: datetime | None = None,
) -> None:
    """Add ``seconds`` of GPU time and ``items`` to the user's usage in the project (the row is
    locked, decayed to ``now`` and written back; made on first use)."""
    now = now or utcnow()
    key = (ShareUsage.project_id == project_id, ShareUsage.user_id == user_id)
    for _ in range(2):
        row = session.execute(
            select(ShareUsage.gpu_seconds, ShareUsage.items, ShareUsage.as_of).where(*key).with_for_update()
        ).one_or_none()
        if row is not None:
            session.execute(
                update(ShareUsage)
                .where(*key)
                .values(
                    gpu_seconds=decayed(row.gpu_seconds, row.as_of, now, half_life_s) + seconds,
                    items=decayed(row.items, row.as_of, now, half_life_s) + items,
                    as_of=now,
                )
            )
            return
        try:
            with session.begin_nested():
                session.add(
                    ShareUsage(project_id=project_id, user_id=user_id, gpu_seconds=seconds, items=items, as_of=now)
                )
            return
        except IntegrityError:  # another worker made the row first: add to it
            continue


def read_usage(session: Session, half_life_s: float, now: datetime | None = None) -> dict[tuple, Usage]:
    """Every ``(project_id, user_id)``'s usage, decayed to ``now``."""
    now = now or utcnow()
    rows = session.execute(
        select(ShareUsage.project_id, ShareUsage.user_id, ShareUsage.gpu_seconds, ShareUsage.items, ShareUsage.as_of)
    )
    return {
        (row.project_id, row.user_id): Usage(
            decayed(row.gpu_seconds, row.as_of, now, half_life_s), decayed(row.items, row.as_of, now, half_life_s)
        )
        for row in rows
    }


def lock_queue(session: Session, queue: str, now: datetime | None = None) -> None:
    """Take the queue's feeder lock until the transaction ends (its row, made on first use), so
    two feeders never fill one window twice."""
    for _ in range(2):
        locked = session.execute(
            update(QueueFeed).where(QueueFeed.queue == queue).values(fed_at=now or utcnow())
        ).rowcount
        if locked:
            return
        try:
            with session.begin_nested():
                session.add(QueueFeed(queue=queue, fed_at=now or utcnow()))
            return
        except IntegrityError:
            continue


# -- shares and caps, as set by an administrator (`farm projects set-share`, `farm users set-quota`)
def set_project_share(
    session: Session,
    name: str,
    *,
    weight: float | None = None,
    max_running: int | None = None,
    clear_cap: bool = False,
) -> Project:
    """Set a project's fair-share weight (> 0) and/or its cap of shards in flight (``clear_cap``:
    back to the setting's default). Unknown projects are refused."""
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"no project {name!r}")
    if weight is not None:
        if not weight > 0 or weight > 1_000_000:
            raise UserError(f"weight: give a number above 0 (at most 1000000), not {weight!r}")
        project.share_weight = float(weight)
    if max_running is not None:
        project.max_running_shards = _cap(max_running, "max running shards")
    if clear_cap:
        project.max_running_shards = None
    return project


def set_user_quota(
    session: Session, name: str, *, max_running: int | None = None, max_items_per_day: int | None = None
) -> User:
    """Set a user's cap of shards in flight and/or of items submitted per 24 hours (0: no cap
    for this user, whatever the settings say)."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}")
    if max_running is not None:
        user.max_running_shards = _cap(max_running, "max running shards")
    if max_items_per_day is not None:
        user.max_items_per_day = _cap(max_items_per_day, "max items per day")
    return user


def _cap(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{what}: give a whole number, 0 or more (0: no cap), not {value!r}")
    return value


def project_shares(session: Session, half_life_s: float, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every project as plain data: weight and cap as set (``None``: the settings' value), GPU
    seconds used (decayed to ``now``), shards in flight now, and members."""
    now = now or utcnow()
    used: dict[uuid.UUID, float] = {}
    for (project_id, _), usage in read_usage(session, half_life_s, now).items():
        used[project_id] = used.get(project_id, 0.0) + usage.gpu_seconds
    flying = dict(
        session.execute(
            select(Job.project_id, func.count())
            .join(Shard, Shard.job_id == Job.id)
            .where(Shard.status.in_([ShardStatus.QUEUED, ShardStatus.RUNNING]))
            .group_by(Job.project_id)
        ).all()
    )
    members = dict(
        session.execute(select(ProjectMember.project_id, func.count()).group_by(ProjectMember.project_id)).all()
    )
    return [
        {
            "name": p.name,
            "weight": p.share_weight,
            "max_running_shards": p.max_running_shards,
            "gpu_seconds": round(used.get(p.id, 0.0), 1),
            "in_flight": int(flying.get(p.id, 0)),
            "members": int(members.get(p.id, 0)),
        }
        for p in session.scalars(select(Project).order_by(Project.name))
    ]
