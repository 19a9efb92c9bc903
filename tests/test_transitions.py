"""State changes (storage.transitions) and leases (storage.leases), on real SQLite and Postgres databases."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farm.errors import InvalidTransition, LeaseLost, NotFound
from storage import leases as leasing
from storage import transitions as t
from storage.models import Job, Shard, utcnow
from storage.status import JobStatus, ShardStatus
from tests.fixtures.database import default_owner

S, J = ShardStatus, JobStatus


# -- the tables ---------------------------------------------------------------------------------


@given(st.sampled_from(list(J)), st.sampled_from(list(J)))
def test_job_check_agrees_with_table(frm: JobStatus, to: JobStatus) -> None:
    if to in t.JOB_TRANSITIONS[frm]:
        t.check_job_transition(frm, to)
    else:
        with pytest.raises(InvalidTransition, match=f"{frm.value} -> {to.value}"):
            t.check_job_transition(frm, to)


@given(st.sampled_from(list(S)), st.sampled_from(list(S)))
def test_shard_check_agrees_with_table(frm: ShardStatus, to: ShardStatus) -> None:
    if to in t.SHARD_TRANSITIONS[frm]:
        t.check_shard_transition(frm, to)
    else:
        with pytest.raises(InvalidTransition, match=f"{frm.value} -> {to.value}"):
            t.check_shard_transition(frm, to)


def test_terminal_states_are_final() -> None:
    assert t.JOB_TRANSITIONS[J.SUCCEEDED] == t.JOB_TRANSITIONS[J.CANCELLED] == frozenset()
    assert t.SHARD_TRANSITIONS[S.SUCCEEDED] == t.SHARD_TRANSITIONS[S.CANCELLED] == frozenset()


# -- guarded updates on real rows -----------------------------------------------------------------


def make_job(session, n_shards: int = 2, items: int = 3) -> Job:
    job = Job(
        kind="text_to_image", family="sd15", spec={}, spec_hash="0" * 64, output_prefix="r", **default_owner(session)
    )
    session.add(job)
    for i in range(n_shards):
        session.add(Shard(job=job, index=i, queue="farm.gpu.sd15", params={}, items_total=items))
    session.commit()
    return job


def status_of(session, model, row_id):
    session.expire_all()
    return session.get(model, row_id).status


@pytest.mark.parametrize(("frm", "to"), [(f, to) for f, tos in t.SHARD_TRANSITIONS.items() for to in sorted(tos)])
def test_every_allowed_shard_edge(session, frm: ShardStatus, to: ShardStatus) -> None:
    shard = make_job(session, 1).shards[0]
    shard.status = frm
    session.commit()
    t.set_shard_status(session, shard.id, to, expected=frm)
    session.commit()
    assert status_of(session, Shard, shard.id) == to


@pytest.mark.parametrize(
    ("frm", "to"),
    [(f, to) for f, to in itertools.product(J, J) if to not in t.JOB_TRANSITIONS[f]][:12],
)
def test_forbidden_job_edges_write_nothing(session, frm: JobStatus, to: JobStatus) -> None:
    job = make_job(session, 1)
    job.status = frm
    session.commit()
    with pytest.raises(InvalidTransition, match=f"{frm.value} -> {to.value}"):
        t.set_job_status(session, job.id, to)
    session.rollback()
    assert status_of(session, Job, job.id) == frm


def test_missing_rows_are_not_found(session) -> None:
    import uuid

    with pytest.raises(NotFound):
        t.set_job_status(session, uuid.uuid4(), J.RUNNING)
    with pytest.raises(NotFound):
        leasing.claim_shard(session, uuid.uuid4(), "w", 30)


def test_lost_race_raises(session_factory) -> None:
    with session_factory() as s:
        job = make_job(s, 1)
    first, second = session_factory(), session_factory()
    try:
        t.set_job_status(first, job.id, J.RUNNING, expected=J.PENDING)
        first.commit()
        # The second caller also saw PENDING; its guarded update finds RUNNING and refuses.
        with pytest.raises(InvalidTransition, match="running -> running"):
            t.set_job_status(second, job.id, J.RUNNING)
        with pytest.raises(InvalidTransition, match="running"):
            t.set_job_status(second, job.id, J.CANCELLED, expected=J.PENDING)
    finally:
        first.close()
        second.close()


# -- leases ---------------------------------------------------------------------------------------


def queued_shard(session) -> Shard:
    shard = make_job(session, 1).shards[0]
    t.set_shard_status(session, shard.id, S.QUEUED)
    session.commit()
    return shard


def test_claim_and_duplicate_delivery(session) -> None:
    shard = queued_shard(session)
    lease = leasing.claim_shard(session, shard.id, "worker-a", 60)
    session.commit()
    assert lease is not None and lease.attempt == 1 and lease.fencing_token == 1
    assert lease.job_id == shard.job_id
    # A redelivered message while the lease is live does nothing.
    assert leasing.claim_shard(session, shard.id, "worker-b", 60) is None
    leasing.finish_shard(session, lease, S.SUCCEEDED, timings={"denoise_s": 1.5}, items_done=3)
    session.commit()
    session.expire_all()
    row = session.get(Shard, shard.id)
    assert row.status == S.SUCCEEDED and row.progress == 1.0 and row.timings == {"denoise_s": 1.5}
    assert row.lease_owner == "worker-a" and row.lease_expires_at is None
    # A redelivery of a finished shard does nothing either.
    assert leasing.claim_shard(session, shard.id, "worker-b", 60) is None


def test_expired_lease_is_taken_over_and_old_attempt_fenced(session) -> None:
    shard = queued_shard(session)
    start = utcnow()
    old = leasing.claim_shard(session, shard.id, "worker-a", 30, now=start)
    session.commit()
    assert leasing.claim_shard(session, shard.id, "worker-b", 30, now=start + timedelta(seconds=29)) is None
    new = leasing.claim_shard(session, shard.id, "worker-b", 30, now=start + timedelta(seconds=31))
    session.commit()
    assert new is not None and new.attempt == 2 and new.fencing_token == old.fencing_token + 1
    session.expire_all()
    assert "lease expired" in session.get(Shard, shard.id).errors[-1]
    # Every write of the dead attempt is refused and changes nothing.
    with pytest.raises(LeaseLost):
        leasing.renew_lease(session, old, 30)
    with pytest.raises(LeaseLost):
        leasing.check_lease(session, old)
    with pytest.raises(LeaseLost):
        leasing.finish_shard(session, old, S.SUCCEEDED)
    with pytest.raises(LeaseLost):
        leasing.release_shard_for_retry(session, old, "boom")
    leasing.check_lease(session, new)
    renewed = leasing.renew_lease(session, new, 30, items_done=2, progress=0.5)
    assert renewed.expires_at >= utcnow() + timedelta(seconds=29)
    session.commit()
    session.expire_all()
    row = session.get(Shard, shard.id)
    assert (row.status, row.lease_owner, row.items_done, row.progress) == (S.RUNNING, "worker-b", 2, 0.5)


def test_retryable_failure_requeues_and_keeps_errors(session) -> None:
    shard = queued_shard(session)
    lease = leasing.claim_shard(session, shard.id, "worker-a", 60)
    leasing.release_shard_for_retry(session, lease, "CUDA out of memory")
    session.commit()
    again = leasing.claim_shard(session, shard.id, "worker-b", 60)
    leasing.finish_shard(session, again, S.FAILED, error="no face found in ref.png")
    session.commit()
    session.expire_all()
    row = session.get(Shard, shard.id)
    assert row.status == S.FAILED and row.attempts == 2
    assert row.error == "no face found in ref.png"
    assert [e.split(": ", 1)[1] for e in row.errors] == ["CUDA out of memory", "no face found in ref.png"]
    with pytest.raises(InvalidTransition):
        leasing.finish_shard(session, again, S.QUEUED)


def test_terminal_shards_cannot_be_claimed_pending_ones_can(session) -> None:
    job = make_job(session, 3)
    pending, done, queued = job.shards
    t.set_shard_status(session, done.id, S.CANCELLED)
    t.set_shard_status(session, queued.id, S.QUEUED)
    session.commit()
    assert leasing.claim_shard(session, done.id, "w", 60) is None
    # A worker may get the message before the scheduler marked the shard queued.
    assert leasing.claim_shard(session, pending.id, "w", 60) is not None
    assert t.mark_shards_queued(session, [pending.id, queued.id]) == 0
    session.commit()
    assert status_of(session, Shard, pending.id) == S.RUNNING
    assert 59 <= leasing.lease_remaining(session, pending.id) <= 60
    assert leasing.lease_remaining(session, queued.id) is None


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ([S.SUCCEEDED, S.SUCCEEDED], J.SUCCEEDED),
        ([S.SUCCEEDED, S.FAILED], J.PARTIAL),
        ([S.FAILED, S.FAILED], J.FAILED),
        ([S.SUCCEEDED, S.CANCELLED], J.CANCELLED),
        ([S.SUCCEEDED, S.RUNNING], None),
    ],
)
def test_rollup(session, outcomes: list[ShardStatus], expected: JobStatus | None) -> None:
    job = make_job(session, len(outcomes), items=4)
    for shard, status in zip(job.shards, outcomes, strict=True):
        shard.status = status
        shard.items_done = 4 if status == S.SUCCEEDED else 1
    session.commit()
    rollup = t.refresh_job_counts(session, job.id)
    session.commit()
    assert rollup.final_status == expected
    assert rollup.all_terminal == (expected is not None)
    session.expire_all()
    row = session.get(Job, job.id)
    assert row.shards_total == len(outcomes) and row.items_total == 4 * len(outcomes)
    assert row.shards_done == outcomes.count(S.SUCCEEDED)
    assert row.items_failed == 3 * outcomes.count(S.FAILED)


def test_cancel_unstarted_shards(session) -> None:
    job = make_job(session, 3)
    a, b, c = job.shards
    t.set_shard_status(session, b.id, S.QUEUED)
    t.set_shard_status(session, c.id, S.QUEUED)
    session.commit()
    lease = leasing.claim_shard(session, c.id, "w", 60)
    assert t.cancel_unstarted_shards(session, job.id) == 2
    session.commit()
    assert [status_of(session, Shard, s.id) for s in (a, b, c)] == [S.CANCELLED, S.CANCELLED, S.RUNNING]
    assert lease is not None


@pytest.mark.integration
def test_concurrent_last_shards_finish_the_job(pg_url: str) -> None:
    """Two workers end the last two shards in overlapping transactions: the later roll-up sees both."""
    import threading

    from storage.db import make_engine, make_session_factory

    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    try:
        with factory() as s:
            job = make_job(s, 2)
            for shard in job.shards:
                t.set_shard_status(s, shard.id, S.QUEUED)
            leases = [leasing.claim_shard(s, shard.id, f"w{i}", 60) for i, shard in enumerate(job.shards)]
            s.commit()
        first, second = factory(), factory()
        leasing.finish_shard(first, leases[0], S.SUCCEEDED)
        leasing.finish_shard(second, leases[1], S.SUCCEEDED)
        rollups = [t.refresh_job_counts(first, job.id)]
        worker = threading.Thread(target=lambda: rollups.append(t.refresh_job_counts(second, job.id)))
        worker.start()
        worker.join(0.5)  # the second roll-up waits for the first transaction
        first.commit()
        worker.join(10)
        second.commit()
        first.close()
        second.close()
        assert [r.final_status for r in rollups] == [None, J.SUCCEEDED]
        with factory() as s:
            assert s.get(Job, job.id).shards_done == 2
    finally:
        engine.dispose()


def test_claim_reads_again_when_the_scheduler_marks_the_shard_queued_meanwhile(session, monkeypatch) -> None:
    """The scheduler's pending -> queued landing between a worker's read and its guarded write is
    not a lost race: the claim reads again and succeeds (it used to answer None, and the message
    was acknowledged with the shard never rendered)."""
    job = make_job(session, n_shards=1)
    shard_id = job.shards[0].id
    original = leasing._try_claim
    calls = []

    def scheduler_lands_first(session, shard_id, *args):
        if not calls:
            t.mark_shards_queued(session, [shard_id])
        calls.append(1)
        return original(session, shard_id, *args)

    monkeypatch.setattr(leasing, "_try_claim", scheduler_lands_first)
    lease = leasing.claim_shard(session, shard_id, "w", 30)
    assert lease is not None and lease.attempt == 1 and len(calls) == 2
    session.commit()
    assert status_of(session, Shard, shard_id) == S.RUNNING
