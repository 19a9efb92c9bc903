"""Security checks with real workers: pickle messages are refused without being run, and the
credentials a farm runs with never show up in its logs, its database, its broker or its outputs.
(Flower's credentials are checked in tests/test_flower.py.)"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.fixtures.farm import ROOT, text_job

PG_SECRET = "pg-" + secrets.token_urlsafe(18)
REDIS_SECRET = "rd-" + secrets.token_urlsafe(18)


class _RunsCode:
    """Unpickling this makes a folder: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.integration
@pytest.mark.slow
def test_workers_refuse_pickle_messages(farm_factory, tiny_models, pg_url, redis_url, tmp_path, fault_table) -> None:
    row = fault_table.row(
        "Security",
        "pickle message on a farm queue",
        "a farm.finalize_job message serialized with pickle whose argument runs os.mkdir when unpickled",
        "refused without being unpickled (JSON only); the worker keeps serving",
    )
    marker = tmp_path / "pickle-ran"
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    worker = farm.start_worker(["farm.control", "farm.gpu.sd15"], name="guard")
    with farm.client() as client:
        client.app.send_task(
            "farm.finalize_job",
            kwargs={"job_id": _RunsCode(marker)},
            queue="farm.control",
            serializer="pickle",
            task_id=str(uuid.uuid4()),
        )
        deadline = time.monotonic() + 60
        while "pickle" not in worker.log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        job_id = client.submit(text_job(tiny_models["sd15"], prompts=["after"], count=1))
        summary = client.wait(job_id, timeout=180)
    log = worker.log.read_text(errors="replace")
    refusal = next(line for line in log.splitlines() if "untrusted content" in line or "ContentDisallowed" in line)
    assert not marker.exists(), "the pickled payload ran"
    assert summary["status"] == "succeeded" and worker.proc.poll() is None
    row.observed = f"worker log: {refusal.split(': ', 1)[-1][:150]}; no folder made; next job succeeded"


def _dump_database(url: str) -> str:
    """Every row of every table, as text."""
    import psycopg
    from sqlalchemy.engine import make_url

    parts = make_url(url)
    with psycopg.connect(
        host=parts.host, port=parts.port, user=parts.username, password=parts.password, dbname=parts.database
    ) as conn:
        tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(r) for t in tables for r in conn.execute(f'SELECT t::text FROM "{t}" t'))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("private_redis", [REDIS_SECRET], indirect=True, ids=["redis-password"])
def test_credentials_never_reach_logs_database_broker_or_outputs(
    farm_factory, tiny_models, pg_database_factory, private_redis, seaweedfs, fault_table
) -> None:
    row = fault_table.row(
        "Security",
        "credentials leaking into logs, the database, the broker or outputs",
        "a job run with a Postgres password, a Redis password and an S3 secret key (all random); "
        "grep worker logs, CLI output, every database row, every Redis key and every stored object",
        "no secret found anywhere; the CLI shows them as ***",
    )
    db_url = pg_database_factory().replace("postgres@", f"postgres:{PG_SECRET}@", 1)  # trust auth ignores it
    farm = farm_factory(broker=private_redis.url(), db_url=db_url, s3=seaweedfs)
    workers = [farm.start_worker(["farm.control"], name="control"), farm.start_worker(["farm.gpu.sd15"], name="gpu")]
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], prompts=["a", "b"], count=1, shard_size=1))
        summary = client.wait(job_id, timeout=180)
        keys = [info.key for info in client.store.list("")]
        objects = {key: client.store.get_bytes(key) for key in keys}
    assert summary["status"] == "succeeded", summary
    cli = [
        subprocess.run(
            [sys.executable, "-m", "farm", *args], env=farm.env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        for args in (["config", "show"], ["status", str(job_id)], ["workers"], ["results", str(job_id)])
    ]
    assert all(done.returncode == 0 for done in cli), [done.stderr[-500:] for done in cli]
    cli_text = "".join(done.stdout + done.stderr for done in cli)
    import redis

    broker = redis.Redis.from_url(private_redis.url())
    broker_text = "".join(repr(broker.dump(key)) for key in broker.scan_iter("*"))
    broker.close()
    places = {
        "worker logs": "".join(w.log.read_text(errors="replace") for w in workers).encode(),
        "CLI output": cli_text.encode(),
        "database rows": _dump_database(db_url).encode(),
        "broker keys": broker_text.encode(),
        "stored objects": b"".join(objects.values()),
    }
    for secret in (PG_SECRET, REDIS_SECRET, seaweedfs.secret_access_key):
        for place, data in places.items():
            assert secret.encode() not in data, f"a credential appears in the {place}"
    assert "***" in cli_text  # the URLs are shown, their passwords hidden
    sizes = ", ".join(f"{place} {len(data) // 1024} KiB" for place, data in places.items())
    row.observed = (
        f"0 of 3 secrets found in {sizes} ({len(objects)} objects incl. manifest, PNG text chunks); "
        "`farm config show` prints the URLs with ***"
    )
