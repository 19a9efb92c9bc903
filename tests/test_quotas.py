"""Quotas a submit must fit (farm/quotas.py): items per job and items per user per day, from the
settings or the user's own cap; a refused submit names the limit and stores nothing."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from farm.quotas import QuotaExceeded
from farm.scheduler import submit_job
from farm.settings import SchedulingSettings
from farm.specs import parse_spec
from storage.identity import create_user
from storage.models import Job
from storage.share_usage import set_user_quota


def spec(items: int) -> object:
    return parse_spec(
        {"model": "/m", "family": "sd15", "prompts": ["a"], "base_seed": 1, "count": items, "output_prefix": "q"}
    )


def jobs_of(session, owner: uuid.UUID) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.owner_id == owner))


def test_a_job_over_the_per_job_cap_is_refused_naming_it(session) -> None:
    owner = create_user(session, f"q{uuid.uuid4().hex[:8]}", "member", project="quota").id
    conf = SchedulingSettings(max_items_per_job=10)
    with pytest.raises(
        QuotaExceeded, match=r"the job has 11 items; a job may have at most 10 \(scheduling.max_items_per_job\)"
    ):
        submit_job(session, spec(11), owner_id=owner, quotas=conf)
    assert jobs_of(session, owner) == 0
    job, created = submit_job(session, spec(10), owner_id=owner, quotas=conf)
    assert created and job.items_total == 10


def test_the_daily_cap_counts_a_users_last_24_hours_and_their_own_cap_wins(session) -> None:
    name = f"q{uuid.uuid4().hex[:8]}"
    owner = create_user(session, name, "member", project="quota").id
    conf = SchedulingSettings(max_items_per_day=12)
    submit_job(session, spec(8), owner_id=owner, quotas=conf)
    said = rf"{name} has submitted 8 items in the last 24 hours; 5 more would pass their daily cap of 12 items"
    with pytest.raises(QuotaExceeded, match=said + r" \(scheduling.max_items_per_day\)"):
        submit_job(session, spec(5), owner_id=owner, quotas=conf)
    assert jobs_of(session, owner) == 1
    set_user_quota(session, name, max_items_per_day=20)  # the user's own cap over the settings'
    submit_job(session, spec(5), owner_id=owner, quotas=conf)
    with pytest.raises(QuotaExceeded, match="daily cap of 20 items \\(set for them with `farm users set-quota`\\)"):
        submit_job(session, spec(8), owner_id=owner, quotas=conf)
    set_user_quota(session, name, max_items_per_day=0)  # 0: no cap for this user
    submit_job(session, spec(8), owner_id=owner, quotas=conf)
    assert jobs_of(session, owner) == 3
