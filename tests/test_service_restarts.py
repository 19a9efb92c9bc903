"""Service restarts during a job: Postgres, Redis and SeaweedFS are each stopped for a few seconds
and started again while real workers render. Workers wait them out with backoff; no shard is lost
or rendered twice into the store, and the job completes.

The servers are the test's own (``private_postgres``, ``private_redis``, ``private_seaweedfs``) so
the drill does not disturb the rest of the session. Redis keeps an append-only file, as a
production broker must: a Redis that keeps nothing on disk loses its queued messages on restart.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, Shard
from storage.status import ShardStatus
from tests.fixtures.farm import text_job
from tests.fixtures.services import wait_for

DOWN_S = 3.0
SHARDS = 10


def _count(factory, *where) -> int:
    with session_scope(factory) as session:
        return session.scalar(select(func.count()).select_from(Shard).where(*where))


# What a worker logs when it runs into an outage of each service and backs off: our own waits
# (farm.outages), the heartbeat and lease renewals, and Celery's consumer reconnecting.
NOTICES = {
    "database": ("the database is unavailable", "worker heartbeat failed", "lease renewal failed"),
    "broker": ("the broker is unavailable", "Connection to broker lost"),
    "object store": ("the object store is unavailable",),
}


def _waits(logs: list, service: str) -> int:
    """Lines where a worker said it backs off from ``service``."""
    texts = [log.read_text(errors="replace") for log in logs]
    return sum(text.count(notice) for text in texts for notice in NOTICES[service])


@pytest.mark.integration
@pytest.mark.slow
def test_job_survives_postgres_redis_and_seaweedfs_restarts(
    farm_factory, tiny_models, private_postgres, private_redis, private_seaweedfs, fault_table
) -> None:
    db_url = private_postgres.create_database("farm")
    farm = farm_factory(
        broker=private_redis.url(),
        db_url=db_url,
        s3=private_seaweedfs.server,
        FARM_BROKER__VISIBILITY_TIMEOUT="60",
        FARM_WORKER__LEASE_SECONDS="30",
    )
    workers = [farm.start_worker(["farm.control"], name="control"), farm.start_worker(["farm.gpu.sd15"], name="gpu")]
    logs = [w.log for w in workers]
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    drills = (
        (private_postgres, "database", "pg_ctl stop -m fast (every connection dropped), start again"),
        (private_redis, "broker", "SIGTERM redis-server (append-only file kept), start again"),
        (private_seaweedfs, "object store", "SIGTERM weed mini, start again on the same ports and data"),
    )
    rows = {
        server.name: fault_table.row(
            "Service restarts",
            f"{server.name} restarted during a job",
            f"{how}: down while a worker renders ({SHARDS} one-image shards) until a worker has run "
            f"into the outage, at least {DOWN_S:.0f} s",
            "workers wait with backoff; no shard lost or duplicated; the job completes",
        )
        for server, _, how in drills
    }
    try:
        with farm.client() as client:
            spec = text_job(
                tiny_models["sd15"], steps=8, count=1, shard_size=1, prompts=[f"p{i}" for i in range(SHARDS)]
            )
            job_id = client.submit(spec)
            seen = []
            for server, service, _ in drills:
                done_before = _count(factory, Shard.job_id == job_id, Shard.status == ShardStatus.SUCCEEDED)
                wait_for(
                    lambda: _count(factory, Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING),
                    120,
                    "a running shard",
                    tolerate=(Exception,),  # the database itself may be coming back
                )
                before = _waits(logs, service)
                server.stop()
                stopped = time.monotonic()
                # Down until a worker has run into the outage (and at least DOWN_S), then back.
                noticed = f"a worker to notice the {server.name} outage"
                wait_for(lambda service=service, before=before: _waits(logs, service) > before, 180, noticed)
                time.sleep(max(0.0, DOWN_S - (time.monotonic() - stopped)))
                server.start()
                down = time.monotonic() - stopped
                wait_for(
                    lambda before=done_before: (
                        _count(factory, Shard.job_id == job_id, Shard.status == ShardStatus.SUCCEEDED) > before + 1
                    ),
                    180,
                    f"progress after the {server.name} restart",
                    tolerate=(Exception,),
                )
                seen.append((server.name, service, down, done_before, _waits(logs, service) - before))
            summary = client.wait(job_id, timeout=300)
            keys = [r["key"] for r in client.results(job_id)]
            bucket = [info.key for info in client.store.list(f"tests/{job_id}/")]
        assert summary["status"] == "succeeded", summary
        assert len(keys) == len(set(keys)) == SHARDS
        images = [key for key in bucket if key.endswith(".png") and not key.endswith("/contact_sheet.png")]
        assert sorted(images) == sorted(keys), "every image is in the store exactly once"
        with session_scope(factory) as session:
            artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
            attempts = session.scalar(select(func.sum(Shard.attempts)).where(Shard.job_id == job_id))
        assert artifacts == SHARDS
        for name, service, down, done_before, waited in seen:
            rows[name].observed = (
                f"down {down:.1f} s after {done_before}/{SHARDS} shards; workers logged {waited} backoffs "
                f"from the {service}; job succeeded, {artifacts} artifacts for {SHARDS} items, "
                f"{len(images)} images in the bucket, {attempts} attempts over {SHARDS} shards"
            )
    finally:
        engine.dispose()
