"""Large jobs through real control workers: a 70,000-shard job on Postgres + Redis is split once
(every shard PENDING in the database, only the queue's window on the broker) and answers status
and cancel with a summary; a scheduler SIGKILLed while it splits a job on RabbitMQ leaves no
duplicate shard and no flood of messages. No GPU worker: nothing is rendered. Times are measured
and reported in the fault table, not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import func, select

from farm.celery_app import MAX_PRIORITY
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job, Shard
from tests.fixtures.farm import ROOT
from tests.fixtures.services import wait_for

GPU_QUEUE = "farm.gpu.sd15"
WINDOW = 2  # scheduling.window_per_queue (the default), and no live GPU worker on the queue


def big_spec(shards: int) -> dict:
    """Single-item shards of a tiny text-to-image spec (10 prompts x shards/10 seeds)."""
    assert shards % 10 == 0
    return {
        "model": "/models/tiny-sd15",  # never loaded: no GPU worker runs
        "family": "sd15",
        "prompts": [f"prompt {i}" for i in range(10)],
        "base_seed": 1,
        "count": shards // 10,
        "steps": 2,
        "width": 64,
        "height": 64,
        "shard_size": 1,
        "output_prefix": "large",
    }


def by_status(factory, job_id: uuid.UUID) -> dict[str, int]:
    with session_scope(factory) as session:
        rows = session.execute(
            select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
        ).all()
    return {status.value: int(n) for status, n in rows}


def job_status(factory, job_id: uuid.UUID) -> str:
    with session_scope(factory) as session:
        return session.scalar(select(Job.status).where(Job.id == job_id)).value


def redis_queue_keys(queue: str) -> list[str]:
    """The Redis transport's priority sub-queues of ``queue`` (``sep`` ``:``, see broker_options)."""
    return [queue, *(f"{queue}:{p}" for p in range(1, MAX_PRIORITY + 1))]


def timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_70000_shard_job_is_scheduled_once_and_summarized(
    farm_factory, pg_database_factory, redis_url, fault_table
) -> None:
    import redis

    shards = 70_000
    row = fault_table.row(
        "Resource faults",
        f"a job of {shards:,} single-item shards (Postgres, Redis)",
        "submit 10 prompts x 7,000 seeds with shard_size 1; one control worker, no GPU worker",
        "split once: every shard in the database, only the window's messages on the broker, job RUNNING; "
        "status and cancel answer with counts and a few shards unless every shard is asked for",
    )
    farm = farm_factory(broker=redis_url, db_url=pg_database_factory())
    engine = make_engine(farm.settings().database_url)
    factory = make_session_factory(engine)
    broker = redis.Redis.from_url(redis_url)
    keys = redis_queue_keys(GPU_QUEUE)
    before = sum(broker.llen(k) for k in keys)
    try:
        control = farm.start_worker(["farm.control"], name="large-control")
        with farm.client() as client:
            started = time.perf_counter()
            job_id = client.submit(big_spec(shards))
            expected = {"queued": WINDOW, "pending": shards - WINDOW}
            wait_for(lambda: by_status(factory, job_id) == expected, 600, "the job split", interval=1.0)
            scheduled_s = time.perf_counter() - started
            control.stop()  # nothing else to do; the cancel's finalize message is not consumed
            messages = sum(broker.llen(k) for k in keys) - before
            assert messages == WINDOW  # the broker holds the window, the database the rest
            assert job_status(factory, job_id) == "running"

            summary, get_s = timed(lambda: client.get(job_id))
            assert summary["shards_total"] == shards and summary["shards_by_status"] == expected
            assert 0 < len(summary["shards"]) == summary["shards_listed"] <= 20
            everything, all_s = timed(lambda: client.get(job_id, shards="all"))
            assert len(everything["shards"]) == shards

            shown, status_s = timed(lambda: _farm(farm, "status", str(job_id)))
            assert shown.returncode == 0, shown.stderr
            assert f"of {shards:,} shards" in shown.stdout and f"{shards - WINDOW:,} pending" in shown.stdout

            listed, listed_s = timed(lambda: _farm(farm, "status", str(job_id), "--shards", "all"))
            assert listed.returncode == 0, listed.stderr
            lines = listed.stdout.splitlines()
            assert sum("\tqueued\t" in line or "\tpending\t" in line for line in lines) == shards

            cancelled, cancel_s = timed(lambda: client.cancel(job_id))
            assert cancelled["status"] == "cancelled" and cancelled["shards_by_status"] == {"cancelled": shards}
            assert by_status(factory, job_id) == {"cancelled": shards}
    finally:
        broker.delete(*keys, "farm.control")  # the session's Redis serves later tests
        broker.close()
        engine.dispose()
    summary_kb, all_mb = len(json.dumps(summary)) / 1e3, len(json.dumps(everything)) / 1e6
    row.observed = (
        f"submit to the job split {scheduled_s:.1f} s; {messages:,} messages on {GPU_QUEUE} for "
        f"{shards:,} shards; client.get {get_s:.2f} s ({summary_kb:.1f} KB JSON, {summary['shards_listed']} "
        f"shards listed; shards='all' {all_s:.2f} s, {all_mb:.1f} MB); `farm status JOB` {status_s:.2f} s "
        f"wall with interpreter start, {len(shown.stdout) / 1e3:.1f} KB printed (--shards all {listed_s:.1f} s, "
        f"{len(listed.stdout) / 1e6:.1f} MB); cancel {cancel_s:.2f} s"
    )
    print(row.observed)


def _farm(farm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm", *args], env=farm.env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_scheduler_killed_while_it_splits_a_job_leaves_no_duplicates(
    farm_factory, pg_database_factory, rabbitmq_url, fault_table
) -> None:
    from kombu import Connection

    shards = 10_000
    row = fault_table.row(
        "Worker death",
        f"scheduler SIGKILLed while it splits a job ({shards:,} shards, RabbitMQ)",
        "SIGKILL the control worker as it takes the scheduling message; a second control worker starts",
        "the redelivered scheduling message splits the job once: every shard once in the database, the "
        "queue's window on the broker (a duplicate of it at most), nothing more",
    )
    farm = farm_factory(broker=rabbitmq_url, db_url=pg_database_factory())
    engine = make_engine(farm.settings().database_url)
    factory = make_session_factory(engine)
    try:
        first = farm.start_worker(["farm.control"], name="splitter-1")
        with farm.client() as client:
            job_id = client.submit(big_spec(shards))
        time.sleep(0.3)  # the split is one transaction: killed in it, nothing of it stays
        first.kill()
        at_kill = by_status(factory, job_id)
        farm.start_worker(["farm.control"], name="splitter-2")
        expected = {"queued": WINDOW, "pending": shards - WINDOW}
        wait_for(lambda: by_status(factory, job_id) == expected, 300, "the job split", interval=0.5)
        with session_scope(factory) as session:
            indexes = session.scalar(select(func.count(func.distinct(Shard.index))).where(Shard.job_id == job_id))
        assert indexes == shards

        with Connection(rabbitmq_url) as conn:
            channel = conn.channel()

            def depth() -> int:
                return channel.queue_declare(GPU_QUEUE, passive=True).message_count

            settled = wait_for(lambda: (lambda a: a == depth() and a)(depth()), 30, "a settled queue depth")
            try:
                assert WINDOW <= settled <= 2 * WINDOW, (settled, at_kill)
            finally:
                channel.queue_purge(GPU_QUEUE)  # the session's vhost serves later tests
    finally:
        engine.dispose()
    row.observed = (
        f"killed with {sum(at_kill.values()):,} shards in the database; after the restart {shards:,} shards, "
        f"each index once, {settled} messages on the broker (window {WINDOW})"
    )
    print(row.observed)
