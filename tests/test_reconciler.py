"""The reconciler's pass on real SQLite and Postgres databases and a real (filesystem) broker:
what it re-sends, fails, finalizes and writes, and that it never acts twice, also when two
passes run at once."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from farm.celery_app import create_app
from farm.errors import StorageUnavailable
from farm.reconciler import Reconciler
from farm.scheduler import schedule_job, submit_job
from farm.settings import FarmSettings
from farm.specs import parse_spec
from storage.db import make_engine, make_session_factory, session_scope
from storage.leases import claim_shard, finish_shard
from storage.models import Job, Shard, utcnow
from storage.objects import open_store
from storage.objects.keys import manifest_key
from storage.registry import register_worker, worker_heartbeat
from storage.status import JobStatus, ShardStatus
from storage.transitions import mark_shards_queued
from tests.fixtures.farm import text_job

S = ShardStatus
QUEUE = "farm.gpu.sd15"
STUCK_S = 30.0


class Setup:
    """A reconciler over one database, a local store and a filesystem broker in ``tmp_path``."""

    def __init__(self, tmp_path: Path, db_url: str, **reconcile) -> None:
        self.settings = FarmSettings(
            _env_file=None,
            data_dir=tmp_path / "data",
            db={"url": db_url},
            worker={"max_attempts": 3, "lease_seconds": 60},
            reconcile={"stuck_after_s": STUCK_S, **reconcile},
            scheduling={"window_per_queue": 50},  # these tests count messages, not windows
        )
        self.engine = make_engine(db_url)
        self.sessions = make_session_factory(self.engine)
        self.app = create_app(self.settings)
        self.store = open_store(self.settings.storage, self.settings.data_dir)
        self.reconciler = Reconciler(self.settings, self.sessions, self.app, self.store)

    def job(self, shards: int = 4, *, schedule: bool = True, queued: bool = True):
        spec = parse_spec(text_job(Path("/models/tiny"), prompts=[f"p{i}" for i in range(shards)], count=1))
        spec = spec.model_copy(update={"shard_size": 1})
        with session_scope(self.sessions) as session:
            job, _ = submit_job(session, spec)
            dispatches = schedule_job(session, job.id) if schedule else []
            if queued:
                mark_shards_queued(session, [d.shard_id for d in dispatches])
            return job.id

    def age(self, job_id, seconds: float) -> None:
        """Make the job's rows look ``seconds`` old."""
        past = utcnow() - timedelta(seconds=seconds)
        with session_scope(self.sessions) as session:
            session.execute(update(Job).where(Job.id == job_id).values(created_at=past, updated_at=past))
            session.execute(update(Shard).where(Shard.job_id == job_id).values(updated_at=past, enqueued_at=past))

    def worker(self, name: str, *, idle_for: float | None = None, busy_with=None) -> None:
        now = utcnow()
        with session_scope(self.sessions) as session:
            register_worker(session, name=name, hostname="h", queues=[QUEUE, "farm.control"], device="cpu", now=now)
            worker_heartbeat(session, name, current_shard_id=busy_with, now=now)
            if idle_for is not None:
                from storage.models import Worker

                session.execute(
                    update(Worker).where(Worker.name == name).values(idle_since=now - timedelta(seconds=idle_for))
                )

    def messages(self, queue: str = QUEUE) -> int:
        folder = self.settings.broker_folder / "messages"
        return sum(1 for p in folder.glob("*.msg") if f".{queue}." in p.name) if folder.exists() else 0

    def shards(self, job_id) -> list:
        with session_scope(self.sessions) as session:
            return session.execute(
                select(Shard.id, Shard.status, Shard.attempts, Shard.error).where(Shard.job_id == job_id)
            ).all()

    def status(self, job_id) -> JobStatus:
        with session_scope(self.sessions) as session:
            return JobStatus(session.scalar(select(Job.status).where(Job.id == job_id)))

    def close(self) -> None:
        self.app.close()
        self.engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def setup(tmp_path: Path, request: pytest.FixtureRequest):
    """On SQLite, or on a Postgres database of its own (the session's has other tests' workers)."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        from storage.migrate import upgrade

        url = request.getfixturevalue("empty_pg_url")
        upgrade(url)
    made = Setup(tmp_path, url)
    yield made
    made.close()


def test_lost_messages_are_sent_again_once_the_queues_workers_idle(setup: Setup) -> None:
    job = setup.job(4)
    setup.age(job, STUCK_S + 5)
    assert setup.reconciler.run_pass().resent_waiting == 0, "no live worker: nothing would take them"
    setup.worker("busy", busy_with=setup.shards(job)[0].id)
    assert setup.reconciler.run_pass().resent_waiting == 0, "a worker is rendering: the queue moves"
    setup.worker("busy", idle_for=5)
    assert setup.reconciler.run_pass().resent_waiting == 0, "idle only briefly"
    setup.worker("busy", idle_for=STUCK_S + 5)
    report = setup.reconciler.run_pass()
    assert report.resent_waiting == 4 and setup.messages() == 4
    assert setup.reconciler.run_pass().resent_waiting == 0, "sent once, not again on the next pass"
    assert {s.status for s in setup.shards(job)} == {S.QUEUED}


def test_shards_left_pending_by_a_dead_scheduler_are_fed(setup: Setup) -> None:
    job = setup.job(3, queued=False)  # scheduled, never published
    setup.age(job, STUCK_S + 5)
    setup.worker("idle", idle_for=STUCK_S + 5)
    report = setup.reconciler.run_pass()
    assert (report.resent_waiting, report.fed) == (0, 3)  # pending shards are the feeder's: no waiting period
    assert {s.status for s in setup.shards(job)} == {S.QUEUED}


def test_a_pending_job_whose_message_was_lost_is_scheduled(setup: Setup) -> None:
    job = setup.job(3, schedule=False, queued=False)
    assert setup.reconciler.run_pass().scheduled == 0, "young: its message may still come"
    setup.age(job, STUCK_S + 5)
    assert setup.reconciler.run_pass().scheduled == 1
    assert setup.status(job) == JobStatus.RUNNING
    assert setup.messages() == 3 and {s.status for s in setup.shards(job)} == {S.QUEUED}
    assert setup.reconciler.run_pass().scheduled == 0


def test_expired_leases_are_sent_for_takeover_then_crash_loops_fail(setup: Setup) -> None:
    job = setup.job(2)
    setup.age(job, 700)
    first, second = (s.id for s in setup.shards(job))
    long_ago = utcnow() - timedelta(seconds=600)
    with session_scope(setup.sessions) as session:
        claim_shard(session, first, "dead-1", 60, now=long_ago)
        lease = claim_shard(session, second, "w", 60)
        finish_shard(session, lease, S.SUCCEEDED)
    report = setup.reconciler.run_pass()
    assert (report.resent_orphaned, report.crash_loops) == (1, 0) and setup.messages() == 1
    assert setup.reconciler.run_pass().resent_orphaned == 0, "re-sent once per stuck period"
    # Two more attempts die the same way: the third expiry fails the shard for good.
    for attempt, owner in ((2, "dead-2"), (3, "dead-3")):
        with session_scope(setup.sessions) as session:
            lease = claim_shard(session, first, owner, 60, now=long_ago + timedelta(seconds=61 * attempt))
            assert lease is not None and lease.attempt == attempt
    with session_scope(setup.sessions) as session:
        assert claim_shard(session, first, "next", 60, max_attempts=3) is None, "no fourth attempt"
    report = setup.reconciler.run_pass()
    assert report.crash_loops == 1 and report.finalized == 1 and report.outputs_written == 1
    row = next(s for s in setup.shards(job) if s.id == first)
    assert row.status == S.FAILED and row.attempts == 3
    assert row.error.startswith("worker process died 3 times on this shard (last: dead-3,")
    assert setup.status(job) == JobStatus.PARTIAL


def test_a_live_holder_keeps_its_lease_after_an_outage(setup: Setup) -> None:
    job = setup.job(1)
    setup.age(job, 120)
    (shard,) = setup.shards(job)
    with session_scope(setup.sessions) as session:
        claim_shard(session, shard.id, "alive", 60, now=utcnow() - timedelta(seconds=90))  # expired 30 s ago
    setup.worker("alive", busy_with=shard.id)
    assert setup.reconciler.run_pass().resent_orphaned == 0, "its keeper renews once the database answers"
    setup.worker("alive", idle_for=1)  # it holds nothing: the attempt is gone
    assert setup.reconciler.run_pass().resent_orphaned == 1


class RefusingStore:
    """The real store, refusing writes while ``full`` is set (a full or read-only disk)."""

    def __init__(self, store) -> None:
        self.store, self.full = store, True

    def put_bytes(self, key, *args, **kwargs):
        if self.full:
            raise StorageUnavailable(f"put {key!r} in {self.store.describe()}: No space left on device")
        return self.store.put_bytes(key, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_job_ends_while_the_store_refuses_and_gets_its_manifest_later(setup: Setup) -> None:
    job = setup.job(2)
    with session_scope(setup.sessions) as session:
        for shard in setup.shards(job):
            finish_shard(session, claim_shard(session, shard.id, "w", 60), S.SUCCEEDED)
    store = RefusingStore(setup.store)
    reconciler = Reconciler(setup.settings, setup.sessions, setup.app, store)
    report = reconciler.run_pass()
    assert report.finalized == 1 and report.outputs_failed == 1 and report.outputs_written == 0
    assert setup.status(job) == JobStatus.SUCCEEDED, "the status does not wait for the store"
    prefix = "tests"
    assert not setup.store.exists(manifest_key(prefix, job))
    store.full = False
    reconciler._output_backoff.clear()  # the backoff's first delay is a pass interval
    assert reconciler.run_pass().outputs_written == 1
    assert setup.store.exists(manifest_key(prefix, job))
    assert reconciler.run_pass().outputs_written == 0, "written once per job end"


@pytest.mark.integration
def test_two_reconcilers_at_once_never_act_twice(tmp_path: Path, empty_pg_url: str) -> None:
    from storage.migrate import upgrade

    upgrade(empty_pg_url)  # a database of its own: other tests' workers are not idle
    setup = Setup(tmp_path, empty_pg_url)
    try:
        jobs = [setup.job(50) for _ in range(3)]
        for job in jobs:
            setup.age(job, STUCK_S + 5)
        setup.worker(f"idle-{tmp_path.name}", idle_for=STUCK_S + 5)
        others = [Reconciler(setup.settings, setup.sessions, setup.app, setup.store) for _ in range(3)]
        before = setup.messages()
        reports = []
        barrier = threading.Barrier(len(others))

        def run(reconciler: Reconciler) -> None:
            barrier.wait()
            reports.append(reconciler.run_pass())

        threads = [threading.Thread(target=run, args=(r,)) for r in others]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(r.resent_waiting for r in reports) == 150
        assert setup.messages() - before == 150, "every shard sent exactly once"
    finally:
        setup.close()
