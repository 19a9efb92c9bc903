"""Large jobs through real control workers: a 70,000-shard job on Postgres + Redis is scheduled
once (one message per shard) and answers status and cancel with a summary; a scheduler SIGKILLed
mid-publish on RabbitMQ re-sends at most one chunk. No GPU worker: nothing is rendered. Times are
measured and reported in the fault table, not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import func, select

from farm.celery_app import MAX_PRIORITY
from farm.dispatch import SEND_CHUNK
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job, Shard
from tests.fixtures.farm import ROOT
from tests.fixtures.services import wait_for

GPU_QUEUE = "farm.gpu.sd15"


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
        "scheduled once: every shard QUEUED, one message per shard, job RUNNING; status and cancel "
        "answer with counts and a few shards unless every shard is asked for",
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
            wait_for(
                lambda: job_status(factory, job_id) == "running" and "pending" not in by_status(factory, job_id),
                600,
                "every shard queued",
                interval=1.0,
            )
            scheduled_s = time.perf_counter() - started
            control.stop()  # nothing else to do; the cancel's finalize message is not consumed
            messages = sum(broker.llen(k) for k in keys) - before
            assert by_status(factory, job_id) == {"queued": shards}
            assert messages == shards
            assert job_status(factory, job_id) == "running"

            summary, get_s = timed(lambda: client.get(job_id))
            assert summary["shards_total"] == shards and summary["shards_by_status"] == {"queued": shards}
            assert 0 < len(summary["shards"]) == summary["shards_listed"] <= 20
            everything, all_s = timed(lambda: client.get(job_id, shards="all"))
            assert len(everything["shards"]) == shards

            shown, status_s = timed(lambda: _farm(farm, "status", str(job_id)))
            assert shown.returncode == 0, shown.stderr
            assert f"of {shards:,} shards" in shown.stdout and f"{shards:,} queued" in shown.stdout

            listed, listed_s = timed(lambda: _farm(farm, "status", str(job_id), "--shards", "all"))
            assert listed.returncode == 0, listed.stderr
            assert sum("\tqueued\t" in line for line in listed.stdout.splitlines()) == shards

            cancelled, cancel_s = timed(lambda: client.cancel(job_id))
            assert cancelled["status"] == "cancelled" and cancelled["shards_by_status"] == {"cancelled": shards}
            assert by_status(factory, job_id) == {"cancelled": shards}
    finally:
        broker.delete(*keys, "farm.control")  # the session's Redis serves later tests
        broker.close()
        engine.dispose()
    summary_kb, all_mb = len(json.dumps(summary)) / 1e3, len(json.dumps(everything)) / 1e6
    row.observed = (
        f"submit to every shard queued {scheduled_s:.1f} s; {messages:,} messages on {GPU_QUEUE} for "
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
def test_a_scheduler_killed_mid_publish_resends_at_most_one_chunk(
    farm_factory, pg_database_factory, rabbitmq_url, fault_table
) -> None:
    from kombu import Connection

    shards = 10_000
    row = fault_table.row(
        "Worker death",
        f"scheduler SIGKILLed mid-publish ({shards:,} shards, RabbitMQ)",
        "SIGKILL the control worker once part of the job's shards are queued; a second control worker starts",
        f"the redelivered scheduling message sends only the shards still pending: at most one chunk "
        f"({SEND_CHUNK}) of duplicates, no shard without a message, every shard QUEUED",
    )
    farm = farm_factory(broker=rabbitmq_url, db_url=pg_database_factory())
    engine = make_engine(farm.settings().database_url)
    factory = make_session_factory(engine)
    try:
        first = farm.start_worker(["farm.control"], name="publisher-1")
        with farm.client() as client:
            job_id = client.submit(big_spec(shards))
        wait_for(
            lambda: by_status(factory, job_id).get("queued", 0) >= 3 * SEND_CHUNK, 300, "3 chunks queued", interval=0.05
        )
        first.kill()
        at_kill = by_status(factory, job_id)
        assert at_kill.get("pending", 0) > 0, f"publishing ended before the kill: {at_kill}"
        farm.start_worker(["farm.control"], name="publisher-2")
        wait_for(lambda: by_status(factory, job_id) == {"queued": shards}, 300, "every shard queued", interval=0.5)

        with Connection(rabbitmq_url) as conn:
            channel = conn.channel()

            def depth() -> int:
                return channel.queue_declare(GPU_QUEUE, passive=True).message_count

            settled = wait_for(lambda: (lambda a: a == depth() and a)(depth()), 30, "a settled queue depth")
            try:
                duplicates = settled - shards
                assert 0 <= duplicates <= SEND_CHUNK, (settled, at_kill)
            finally:
                channel.queue_purge(GPU_QUEUE)  # the session's vhost serves later tests
    finally:
        engine.dispose()
    row.observed = (
        f"killed with {at_kill.get('queued', 0):,} queued and {at_kill.get('pending', 0):,} pending; after the restart "
        f"{settled:,} messages for {shards:,} shards: {duplicates} duplicates (chunk {SEND_CHUNK}), every shard queued"
    )
    print(row.observed)
