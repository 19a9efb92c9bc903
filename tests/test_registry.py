"""Worker registry, lost-worker sweep, blocklist streaks and the failure policy (attempts and
distinct workers), on real SQLite and Postgres databases."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from storage import blocklist, registry
from storage import leases as t
from storage.db import session_scope
from storage.models import Job, Shard, Worker, utcnow
from storage.status import ShardStatus, WorkerStatus
from tests.test_transitions import make_job

S = ShardStatus


@pytest.fixture
def session(session_factory):
    with session_factory() as s:
        yield s


def _register(session, name: str, queues=("farm.gpu.sd15",), now=None) -> None:
    registry.register_worker(session, name=name, hostname="host", queues=list(queues), device="cpu", now=now)
    session.commit()


def _claim(session, shard_id: uuid.UUID, owner: str, lease_seconds: float = 60.0) -> t.ShardLease:
    lease = t.claim_shard(session, shard_id, owner, lease_seconds)
    session.commit()
    assert lease is not None
    return lease


def _unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"  # the Postgres database is shared by the test session


def _listed(session, *names: str, now=None) -> dict[str, dict]:
    return {w["name"]: w for w in registry.list_workers(session, lost_after_s=60, now=now) if w["name"] in names}


def test_register_heartbeat_and_stop(session) -> None:
    w1 = _unique("w1")
    _register(session, w1, now=utcnow() - timedelta(minutes=5))
    _register(session, w1)  # the same name again refreshes the row
    assert session.query(Worker).filter(Worker.name == w1).count() == 1
    assert registry.worker_heartbeat(session, w1, pinned_models=["sd15:/m"])
    assert not registry.worker_heartbeat(session, _unique("nobody"))
    registry.stop_worker(session, w1)
    session.commit()
    assert not registry.worker_heartbeat(session, w1)  # stopped: it must register again
    row = _listed(session, w1)[w1]
    assert (row["status"], row["pinned_models"], row["queues"]) == ("stopped", ["sd15:/m"], ["farm.gpu.sd15"])


def test_silent_worker_is_lost_and_its_leases_expire(session) -> None:
    job = make_job(session, n_shards=2)
    shards = sorted(job.shards, key=lambda s: s.index)
    now = utcnow()
    dead, alive = _unique("dead"), _unique("alive")
    _register(session, dead, now=now - timedelta(seconds=90))
    _register(session, alive, now=now)
    lease = _claim(session, shards[0].id, dead, lease_seconds=600)
    _claim(session, shards[1].id, alive, lease_seconds=600)

    listed = _listed(session, dead, alive, now=now)
    assert listed[dead]["status"] == "lost"  # shown lost before any sweep
    assert listed[alive]["current_shard"]["index"] == 1

    assert dead in registry.sweep_lost_workers(session, lost_after_s=60, now=now)
    session.commit()
    session.expire_all()
    assert session.get(Worker, _id(session, dead)).status == WorkerStatus.LOST
    assert session.get(Shard, shards[0].id).lease_expires_at <= now  # expired at once, not in 10 minutes
    assert session.get(Shard, shards[1].id).lease_expires_at > now
    taken = t.claim_shard(session, shards[0].id, alive, 60)
    assert taken is not None and taken.attempt == lease.attempt + 1
    assert dead not in registry.sweep_lost_workers(session, lost_after_s=60, now=now)  # already lost
    assert registry.worker_heartbeat(session, dead)  # it spoke again: online
    session.commit()
    assert session.get(Worker, _id(session, dead)).status == WorkerStatus.ONLINE


def _id(session, name: str) -> uuid.UUID:
    return session.query(Worker.id).filter(Worker.name == name).scalar()


def test_live_workers_by_queue(session) -> None:
    now = utcnow()
    queue = f"farm.gpu.test-{uuid.uuid4().hex[:6]}"  # the Postgres database is shared by the session
    _register(session, f"{queue}-one", queues=[queue], now=now)
    _register(session, f"{queue}-both", queues=[queue, "farm.gpu.sdxl"], now=now)
    _register(session, f"{queue}-old", queues=[queue], now=now - timedelta(hours=1))
    assert sorted(registry.live_workers(session, queue, 60)) == [f"{queue}-both", f"{queue}-one"]


def test_failure_streak_blocks_and_success_resets(session) -> None:
    job = make_job(session)
    assert not blocklist.record_failure_streak(session, job.id, "w", "CUDA error", block_after=3)
    blocklist.record_success(session, job.id, "w")  # streak over
    assert not blocklist.record_failure_streak(session, job.id, "w", "CUDA error", block_after=3)
    assert not blocklist.record_failure_streak(session, job.id, "w", "CUDA error", block_after=3)
    assert not blocklist.is_blocked(session, job.id, "w")
    assert blocklist.record_failure_streak(session, job.id, "w", "CUDA error again", block_after=3)
    assert not blocklist.record_failure_streak(session, job.id, "w", "still", block_after=3)  # only once
    session.commit()
    assert blocklist.is_blocked(session, job.id, "w") and not blocklist.is_blocked(session, job.id, "other")
    (blocked,) = blocklist.blocked_workers(session, job.id)
    assert (blocked["worker"], blocked["failures_in_a_row"], blocked["failures"]) == ("w", 4, 5)
    assert blocked["last_error"] == "still"
    assert not blocklist.record_failure_streak(session, job.id, "x", "e", block_after=0)  # 0 = never


def test_unblocked_workers_leave_out_blocked_and_silent(session) -> None:
    job = make_job(session)
    queue = f"farm.gpu.test-{uuid.uuid4().hex[:6]}"
    for name in ("a", "b"):
        _register(session, f"{queue}-{name}", queues=[queue])
    _register(session, f"{queue}-gone", queues=[queue], now=utcnow() - timedelta(hours=1))
    blocklist.record_failure_streak(session, job.id, f"{queue}-a", "e", block_after=1)
    session.commit()
    assert blocklist.unblocked_workers(session, job.id, queue, 60) == [f"{queue}-b"]


def test_shard_fails_for_good_on_the_nth_different_worker(session) -> None:
    job = make_job(session, n_shards=1)
    shard_id = job.shards[0].id
    statuses = []
    for owner in ("a", "a", "b", "c"):
        lease = _claim(session, shard_id, owner)
        statuses.append(
            t.record_failure(session, lease, f"boom on {owner}", retryable=True, max_attempts=10, max_workers=3)
        )
        session.commit()
    assert statuses == [S.QUEUED, S.QUEUED, S.QUEUED, S.FAILED]
    session.expire_all()
    shard = session.get(Shard, shard_id)
    assert shard.failed_workers == ["a", "b", "c"]
    reasons = [e.split(": ", 1)[1] for e in shard.errors]
    assert reasons[:3] == ["boom on a", "boom on a", "boom on b"]  # every error is kept
    assert reasons[3] == shard.error == "boom on c (failed on 3 different workers: a, b, c)"


def test_attempts_and_user_errors_still_end_a_shard(session) -> None:
    job = make_job(session, n_shards=2)
    first, second = sorted(job.shards, key=lambda s: s.index)
    lease = _claim(session, first.id, "a")
    assert t.record_failure(session, lease, "no face", retryable=False, max_attempts=5, max_workers=3) == S.FAILED
    lease = _claim(session, second.id, "a")
    assert t.record_failure(session, lease, "oom", retryable=True, max_attempts=1, max_workers=3) == S.FAILED
    session.commit()
    session.expire_all()
    assert session.get(Shard, first.id).error == "no face"
    assert session.get(Shard, second.id).failed_workers == ["a"]


def test_worker_rows_survive_their_job(session_factory) -> None:
    """Deleting a job removes its blocklist rows (cascade) but not the workers."""
    name = _unique("w")
    with session_scope(session_factory) as session:
        job = make_job(session)
        _register(session, name)
        blocklist.record_failure_streak(session, job.id, name, "e", block_after=1)
        job_id = job.id
    with session_scope(session_factory) as session:
        session.delete(session.get(Job, job_id))
    with session_scope(session_factory) as session:
        assert blocklist.blocked_workers(session, job_id) == []
        assert name in _listed(session, name)
