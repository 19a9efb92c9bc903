"""Quotas a submit must fit, decided in the database: items per job and items per user per day
(``scheduling.max_items_per_job``, ``scheduling.max_items_per_day`` or the user's own cap from
``farm users set-quota``). A submit over a quota is refused, naming the limit; nothing is stored.

Running caps (shards in flight per project and per user) are not checked here: a job over them
is accepted and waits (:mod:`farm.fair_share`; ``farm status`` says why, :func:`waiting_reason`).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.errors import UserError
from farm.settings import SchedulingSettings
from storage.models import Job, User, utcnow

DAY = timedelta(hours=24)


class QuotaExceeded(UserError):
    """A submit over a quota; the message names the limit and where it is set."""


def check_items(
    session: Session,
    conf: SchedulingSettings,
    owner_id: uuid.UUID,
    items: int,
    *,
    per_job: bool = True,
    now: datetime | None = None,
) -> None:
    """Refuse ``items`` more items from ``owner_id`` when they pass the per-job cap (``per_job``)
    or the owner's daily cap (the items of their jobs made in the last 24 hours count)."""
    if per_job and conf.max_items_per_job and items > conf.max_items_per_job:
        raise QuotaExceeded(
            f"the job has {items} items; a job may have at most {conf.max_items_per_job} "
            "(scheduling.max_items_per_job): split it into several jobs"
        )
    name, own_cap = session.execute(select(User.name, User.max_items_per_day).where(User.id == owner_id)).one()
    cap = conf.user_items_per_day(own_cap)
    if not cap:
        return
    since = (now or utcnow()) - DAY
    used = session.scalar(
        select(func.coalesce(func.sum(Job.items_total), 0)).where(Job.owner_id == owner_id, Job.created_at > since)
    )
    if used + items > cap:
        where = "set for them with `farm users set-quota`" if own_cap is not None else "scheduling.max_items_per_day"
        raise QuotaExceeded(
            f"{name} has submitted {used} items in the last 24 hours; {items} more would pass their daily cap "
            f"of {cap} items ({where})"
        )
