"""Bulk renders through real workers on Redis + Postgres: a 200-row manifest (40 shards) fed in
windows of 20, and a crash (scheduler and worker killed) resumed by submitting again, then the next night's
appended rows and the dataset export."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, BulkJob, Job
from tests.fixtures.services import wait_for
from tests.test_operations import _farm_cli

pytestmark = pytest.mark.integration


def _base(model: Path, tmp_path: Path, **overrides) -> Path:
    spec = {
        "model": str(model),
        "family": "sd15",
        "prompts": ["a dataset image"],
        "seeds": [1],
        "steps": 1,
        "guidance": 5.0,
        "width": 64,
        "height": 64,
        "shard_size": 10,
        "output_prefix": "datasets",
        **overrides,
    }
    path = tmp_path / "base.json"
    path.write_text(json.dumps(spec))
    return path


def _manifest(path: Path, ids: range) -> Path:
    with path.open("a") as f:
        for i in ids:
            f.write(json.dumps({"id": f"row{i:05d}", "prompt": f"sample {i % 7}"}) + "\n")
    return path


def _artifacts(pg_url: str, name: str) -> dict[str, tuple]:
    engine = make_engine(pg_url)
    with session_scope(make_session_factory(engine)) as s:
        rows = s.execute(
            select(Artifact.key, Artifact.sha256, Artifact.created_at, Artifact.fencing_token)
            .join(Job, Job.id == Artifact.job_id)
            .join(BulkJob, BulkJob.id == Job.bulk_id)
            .where(BulkJob.name == name)
        ).all()
    engine.dispose()
    return {r.key: (r.sha256, r.created_at, r.fencing_token) for r in rows}


def _broker_depth(redis_url: str, queue: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = [queue, *(f"{queue}:{p}" for p in range(1, 10))]
    depth = sum(client.llen(k) for k in keys)
    client.close()
    return depth


ROWS = 200  # 40 shards of 5: twice the window (10k and 100k rows: bench/bulk_feed.py, no renders)


def test_forty_shards_in_windows_of_twenty(farm_factory, tiny_models, pg_url, redis_url, tmp_path) -> None:
    # a window of 20 on the broker: one per live worker (one) + 19
    farm = farm_factory(broker=redis_url, db_url=pg_url, FARM_SCHEDULING__WINDOW_PER_QUEUE="19")
    farm.start_worker(["farm.control"], name="bulk-control")
    farm.start_worker(["farm.gpu.sd15"], name="bulk-gpu")
    name = "forty-shards"
    manifest = _manifest(tmp_path / "rows.jsonl", range(ROWS))
    depths: list[int] = []
    in_flight: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        from farm.feeder import in_flight as count_in_flight

        engine = make_engine(pg_url)
        factory = make_session_factory(engine)
        while not stop.is_set():
            depths.append(_broker_depth(redis_url, "farm.gpu.sd15"))
            with session_scope(factory) as s:
                in_flight.append(sum(count_in_flight(s, "farm.gpu.sd15").here.values()))
            time.sleep(0.05)
        engine.dispose()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        started = time.monotonic()
        base = _base(tiny_models["sd15"], tmp_path, shard_size=5)  # 40 shards through windows of 20
        submitted = _farm_cli(farm, "bulk", "submit", str(manifest), "--base", str(base), "--name", name)
        submit_s = time.monotonic() - started
        assert submitted.returncode == 0, submitted.stderr
        said = " ".join(submitted.stdout.split())
        assert f"{ROWS} new row(s)" in said and "20 sent now" in said, said
        with farm.client() as client:
            wait_for(lambda: client.bulk_status(name)["done"] == ROWS, 400, f"{ROWS} rows")
            status = client.bulk_status(name)
    finally:  # the sampler reads the session's database: it stops before the test does
        stop.set()
        sampler.join(timeout=10)
    assert (status["failed"], status["remaining"], status["families"]["sd15"]["done"]) == (0, 0, ROWS)
    assert max(depths) <= 20 and max(in_flight) <= 20 and max(in_flight) >= 10  # windows, used
    artifacts = _artifacts(pg_url, name)
    assert len(artifacts) == ROWS and {k.rsplit("/", 1)[1] for k in artifacts} == {
        f"row{i:05d}.png" for i in range(ROWS)
    }
    print(f"submit {submit_s:.1f}s; max broker depth {max(depths)}; max in flight {max(in_flight)}")


def test_crash_then_resume_renders_only_the_remainder(farm_factory, tiny_models, pg_url, redis_url, tmp_path) -> None:
    farm = farm_factory(
        broker=redis_url,
        db_url=pg_url,
        FARM_SCHEDULING__WINDOW_PER_QUEUE="4",
        FARM_BROKER__VISIBILITY_TIMEOUT="10",
        FARM_WORKER__LOST_AFTER_S="3",
        # The killed worker's shard comes back within seconds, not minutes: a delivery that finds its
        # lease still live is retried once the lease could have expired (lease_seconds, 120 by
        # default), and a message lost with the killed processes is sent again by the reconciler
        # (interval_s 30, stuck_after_s 120 by default).
        FARM_WORKER__LEASE_SECONDS="10",
        FARM_RECONCILE__INTERVAL_S="1",
        FARM_RECONCILE__STUCK_AFTER_S="4",
    )
    name = "resumable"
    base = _base(tiny_models["sd15"], tmp_path, steps=2, shard_size=2)
    manifest = _manifest(tmp_path / "rows.jsonl", range(40))
    control = farm.start_worker(["farm.control"], name="bulk-sched")
    worker = farm.start_worker(["farm.gpu.sd15"], name="bulk-render")
    assert _farm_cli(farm, "bulk", "submit", str(manifest), "--base", str(base), "--name", name).returncode == 0
    wait_for(lambda: len(_artifacts(pg_url, name)) >= 10, 120, "some rows rendered")
    worker.kill()
    control.kill()
    before = _artifacts(pg_url, name)
    assert 10 <= len(before) < 40

    farm.start_worker(["farm.control"], name="bulk-sched-2")
    farm.start_worker(["farm.gpu.sd15"], name="bulk-render-2")
    resumed = _farm_cli(farm, "bulk", "submit", str(manifest), "--base", str(base), "--name", name)
    assert resumed.returncode == 0 and "0 new row(s), 40 already there" in " ".join(resumed.stdout.split())
    with farm.client() as client:
        wait_for(lambda: client.bulk_status(name)["done"] == 40, 240, "the remaining rows")
        after = _artifacts(pg_url, name)
        assert len(after) == 40
        assert all(after[key] == value for key, value in before.items())  # nothing rendered twice

        # The next night: five rows appended to the manifest; only they are rendered.
        _manifest(manifest, range(40, 45))
        night2 = _farm_cli(farm, "bulk", "submit", str(manifest), "--base", str(base), "--name", name)
        assert "5 new row(s), 40 already there" in " ".join(night2.stdout.split())
        wait_for(lambda: client.bulk_status(name)["done"] == 45, 120, "the appended rows")
        status = _farm_cli(farm, "bulk", "status", name)
        assert status.returncode == 0 and "45" in status.stdout
    final = _artifacts(pg_url, name)
    assert all(final[key] == value for key, value in after.items())
    exported = tmp_path / "dataset.jsonl"
    assert _farm_cli(farm, "bulk", "export", name, "--out", str(exported)).returncode == 0
    records = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(records) == 45 and {r["row_id"] for r in records} == {f"row{i:05d}" for i in range(45)}
    assert all(final[r["key"]][0] == r["sha256"] and r["model_hash"] and r["params"]["prompt"] for r in records)
