"""One reconciler pass over a big shard table (100,000 shards by default) on Postgres.

The table holds what a busy farm holds: most shards succeeded, some queued behind live workers,
a few running under live leases, and a share of *stuck* ones (waiting with lost messages on an
idle queue, running with expired leases, a job whose shards all ended but that was never
finalized). The bench times

- the **first pass**, which finds and re-sends every stuck shard and finalizes the ended jobs;
- the **steady pass** afterwards, which finds nothing to do (what every control worker pays every
  ``reconcile.interval_s``);

against a baseline run in the same process on the same table: one ``SELECT status, count(*) ...
GROUP BY status`` over every shard, the cheapest full look a pass could take.

    python -m bench reconcile_pass [--shards 100000] [--db-url postgresql+psycopg://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.cli import write_json

JOB_SHARDS = 1000
QUEUE_IDLE, QUEUE_BUSY = "farm.gpu.sd15", "farm.gpu.sdxl"


def _fill(engine: Any, shards: int) -> dict[str, int]:
    """Jobs of ``JOB_SHARDS`` shards each, in the mix described above; returns what is stuck."""
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from storage.identity import ensure_default_identity
    from storage.models import Job, Shard, Worker, utcnow
    from storage.status import JobStatus, ShardStatus, WorkerStatus

    with Session(engine) as session:
        admin, project = ensure_default_identity(session)
        owned = {"owner_id": admin.id, "project_id": project.id}
        session.commit()
    now = utcnow()
    old = now - timedelta(hours=1)
    jobs, rows = [], []
    stuck = {"waiting": 0, "orphaned": 0, "ended_jobs": 0}
    for j in range(max(1, shards // JOB_SHARDS)):
        job_id = uuid.uuid4()
        queue = QUEUE_IDLE if j % 2 == 0 else QUEUE_BUSY
        ended = j == 1  # every shard succeeded, never finalized
        jobs.append(
            {
                "id": job_id,
                "kind": "text_to_image",
                "family": queue.rsplit(".", 1)[1],
                "status": JobStatus.RUNNING,
                "priority": 0,
                "spec": {},
                "spec_hash": "0" * 64,
                "output_prefix": "bench",
                **owned,
                "shards_total": JOB_SHARDS,
                "created_at": old,
                "updated_at": old,
            }
        )
        stuck["ended_jobs"] += int(ended)
        for i in range(JOB_SHARDS):
            share = i % 100
            status, lease = ShardStatus.SUCCEEDED, None
            if not ended and share < 15:
                status = ShardStatus.QUEUED
                stuck["waiting"] += int(queue == QUEUE_IDLE)
            elif not ended and share < 19:
                status, lease = ShardStatus.RUNNING, now + timedelta(seconds=60)
            elif not ended and share < 20:
                status, lease = ShardStatus.RUNNING, old
                stuck["orphaned"] += 1
            rows.append(
                {
                    "id": uuid.uuid4(),
                    "job_id": job_id,
                    "index": i,
                    "queue": queue,
                    "status": status,
                    "params": {},
                    "items_total": 1,
                    "items_done": int(status == ShardStatus.SUCCEEDED),
                    "attempts": 1,
                    "fencing_token": 1,
                    "lease_owner": "bench-dead" if lease == old else ("bench-busy" if lease else None),
                    "lease_expires_at": lease,
                    "errors": [],
                    "failed_workers": [],
                    "timings": {},
                    "enqueued_at": old,
                    "created_at": old,
                    "updated_at": old,
                }
            )
    with engine.begin() as conn:
        conn.execute(insert(Job), jobs)
        for start in range(0, len(rows), 5000):
            conn.execute(insert(Shard), rows[start : start + 5000])
        for name, queues, idle in (("bench-idle", [QUEUE_IDLE], old), ("bench-busy", [QUEUE_BUSY], None)):
            conn.execute(
                insert(Worker),
                [
                    {
                        "id": uuid.uuid4(),
                        "name": name,
                        "hostname": "bench",
                        "queues": queues,
                        "device": "cpu",
                        "pinned_models": [],
                        "status": WorkerStatus.ONLINE,
                        "current_shard_id": None if idle else rows[17]["id"],
                        "idle_since": idle,
                        "started_at": old,
                        "heartbeat_at": now + timedelta(hours=1),  # alive for the whole bench
                        "created_at": old,
                        "updated_at": old,
                    }
                ],
            )
    return stuck


def _baseline_s(engine: Any) -> float:
    from sqlalchemy import func, select

    from storage.models import Shard

    started = time.perf_counter()
    with engine.connect() as conn:
        conn.execute(select(Shard.status, func.count()).group_by(Shard.status)).all()
    return time.perf_counter() - started


def run(shards: int, db_url: str, repeats: int) -> dict[str, Any]:
    import psycopg
    from sqlalchemy import text

    from farm.celery_app import create_app
    from farm.reconciler import Reconciler
    from farm.settings import FarmSettings
    from storage.db import make_engine, make_session_factory
    from storage.migrate import upgrade
    from storage.objects import open_store

    name = f"farm_bench_reconcile_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = db_url.rsplit("/", 1)[0] + f"/{name}"
    engine = None
    try:
        upgrade(url)
        engine = make_engine(url)
        stuck = _fill(engine, shards)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        with tempfile.TemporaryDirectory() as data:
            settings = FarmSettings(_env_file=None, data_dir=Path(data), db={"url": url})
            app = create_app(settings)
            store = open_store(settings.storage, settings.data_dir)
            reconciler = Reconciler(settings, make_session_factory(engine), app, store)
            baseline = statistics.median(_baseline_s(engine) for _ in range(repeats))
            first = reconciler.run_pass()
            catch_up = [reconciler.run_pass() for _ in range(20)]  # batches past reconcile.batch
            steady = [reconciler.run_pass() for _ in range(repeats)]
            app.close()
        steady_s = statistics.median(r.seconds for r in steady)
        return {
            "shards": shards,
            "stuck": stuck,
            "first_pass": first.as_dict(),
            "catch_up_passes": sum(r.acted for r in catch_up),
            "steady_pass_s": steady_s,
            "steady_actions": sum(r.resent_waiting + r.resent_orphaned + r.finalized for r in steady),
            "baseline_group_by_s": baseline,
            "first_vs_baseline": first.seconds / baseline,
            "steady_vs_baseline": steady_s / baseline,
        }
    finally:
        if engine is not None:
            engine.dispose()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--db-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.shards, args.db_url, args.repeats)
    first = result["first_pass"]
    print(f"{result['shards']:,} shards; stuck: {result['stuck']}")
    print(
        f"first pass  {first['seconds']:.3f}s  resent waiting {first['resent_waiting']}, orphaned "
        f"{first['resent_orphaned']}, finalized {first['finalized']}  ({result['first_vs_baseline']:.1f}x baseline)"
    )
    print(f"then {result['catch_up_passes']} more pass(es) with work (at most reconcile.batch shards per step)")
    print(
        f"steady pass {result['steady_pass_s']:.3f}s  actions {result['steady_actions']}  "
        f"({result['steady_vs_baseline']:.2f}x baseline)"
    )
    print(f"baseline    {result['baseline_group_by_s']:.3f}s  (SELECT status, count(*) FROM shard GROUP BY status)")
    write_json(args.json, result)
