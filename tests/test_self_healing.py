"""Faults that lose a message or a worker, with real worker processes on private servers: every
job still ends, each succeeded item has exactly one artifact row and one object, and no object
lacks a row. The control worker runs the reconciler every second here (``reconcile.interval_s``)
and treats a message as lost after 4 s of idle workers (``reconcile.stuck_after_s``)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from farm.errors import JobNotScheduled
from tests.fixtures.consistency import check_job_outputs
from tests.fixtures.farm import ROOT, text_job
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_RECOVERY = {
    "FARM_RECONCILE__INTERVAL_S": "1",
    "FARM_RECONCILE__STUCK_AFTER_S": "4",
    "FARM_WORKER__LEASE_SECONDS": "10",
    "FARM_WORKER__LOST_AFTER_S": "8",
}
FAULTS = str(ROOT / "tests" / "fixtures" / "faults")
DB_OUTAGE_S = 15  # 1.5 x FAST_RECOVERY's lease_seconds


def _statuses(client, *job_ids) -> list[str]:
    return [client.get(job_id)["status"] for job_id in job_ids]


def _ended(client, *job_ids) -> bool:
    return all(s in ("succeeded", "partial", "failed", "cancelled") for s in _statuses(client, *job_ids))


def test_a_broker_restarted_empty_loses_nothing(
    amnesiac_redis, farm_factory, tiny_models, pg_database_factory, tmp_path, fault_table
) -> None:
    """Redis without persistence restarted mid-job (every queued message gone), then a submit
    while it is down: the plain job, a bulk job's window and the job submitted into the outage
    all end, rendered exactly once. (amnesiac_redis first: it outlives the workers.)"""
    row = fault_table.row(
        "Self-healing",
        "Broker restarted empty mid-job; submit while it is down",
        "redis-server without AOF or RDB stopped and started while 2 jobs render (16 one-image shards, "
        "and a 12-row bulk job in windows of 3), then stopped again for a `submit`",
        "every lost shard and job is sent again from the database; all jobs succeed; 1 row and 1 object per item",
    )
    farm = farm_factory(
        broker=amnesiac_redis.url(),
        db_url=pg_database_factory(),
        FARM_SCHEDULING__WINDOW_PER_QUEUE="3",
        **FAST_RECOVERY,
    )
    farm.start_worker(["farm.control"], name="control")
    farm.start_worker(["farm.gpu.sd15"], name="gpu")
    model = tiny_models["sd15"]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"row{i:03d}", "prompt": f"row {i}"}) + "\n" for i in range(12)))
    with farm.client() as client:
        job = client.submit(text_job(model, steps=3, count=1, shard_size=1, prompts=[f"p{i}" for i in range(16)]))
        bulk = text_job(model, steps=2, count=1, shard_size=2, prompts=["x"], output_prefix="datasets")
        client.submit_bulk("amnesia", bulk, manifest)
        wait_for(lambda: client.get(job)["items_done"] >= 2, 120, "two items rendered")
        amnesiac_redis.stop()
        amnesiac_redis.start()
        restarted = time.monotonic()
        at_restart = client.get(job)["items_done"]
        amnesiac_redis.stop()
        with pytest.raises(JobNotScheduled, match="recorded but not scheduled yet: the broker is unreachable"):
            client.submit(text_job(model, steps=2, count=1, shard_size=1, prompts=["late 1", "late 2"]))
        late = client.list_jobs(limit=1)[0]["id"]
        assert client.get(late)["status"] == "pending"
        amnesiac_redis.start()
        bulk_jobs = [j["id"] for j in client.list_jobs(limit=10) if j["id"] not in (str(job), late)]
        wait_for(lambda: _ended(client, job, late, *bulk_jobs), 240, "every job to end")
        healed_s = time.monotonic() - restarted
        assert _statuses(client, job, late, *bulk_jobs) == ["succeeded"] * (2 + len(bulk_jobs))
        assert client.bulk_status("amnesia")["done"] == 12
        counts = [check_job_outputs(client, j) for j in (job, late, *bulk_jobs)]
    assert counts[0]["artifacts"] == 16 and counts[1]["artifacts"] == 2
    assert sum(c["artifacts"] for c in counts[2:]) == 12
    log = (farm.tmp_path / "control.log").read_text(errors="replace")
    assert "reconciler:" in log and "resent waiting" in log
    row.observed = (
        f"{at_restart}/16 items done at the restart; the submit into the outage raised JobNotScheduled and left "
        f"the job pending; all {2 + len(bulk_jobs)} jobs succeeded {healed_s:.0f} s after the restart, "
        f"artifacts {[c['artifacts'] for c in counts]} = objects {[c['objects'] for c in counts]}"
    )


def test_a_database_outage_longer_than_the_lease_strands_nothing(
    private_postgres, farm_factory, tiny_models, redis_url, fault_table
) -> None:
    # private_postgres first: set up before farm_factory, so it is torn down after the workers
    # stop (a worker stopping without its database waits out the outage until it is killed)
    row = fault_table.row(
        "Self-healing",
        "Database down longer than the lease",
        f"pg_ctl stop for {DB_OUTAGE_S} s (lease_seconds {FAST_RECOVERY['FARM_WORKER__LEASE_SECONDS']}) while "
        "shards render, then start",
        "workers keep their leases through the outage (or the shards are sent again); the job succeeds",
    )
    db_url = private_postgres.create_database("farm")
    farm = farm_factory(broker=redis_url, db_url=db_url, **FAST_RECOVERY)
    farm.start_worker(["farm.control"], name="control")
    farm.start_worker(["farm.gpu.sd15"], name="gpu-a")
    farm.start_worker(["farm.gpu.sd15"], name="gpu-b")
    with farm.client() as client:
        job = client.submit(text_job(tiny_models["sd15"], steps=8, count=1, shard_size=2, prompts=list("abcdefgh")))
        wait_for(
            lambda: sum(s["status"] == "running" for s in client.get(job)["shards"]) >= 2, 120, "two running shards"
        )
        private_postgres.stop()
        time.sleep(DB_OUTAGE_S)
        private_postgres.start()
        back = time.monotonic()
        summary = client.wait(job, timeout=240)
        healed_s = time.monotonic() - back
        counts = check_job_outputs(client, job)
    assert summary["status"] == "succeeded", summary
    assert counts["artifacts"] == counts["objects"] == 8
    attempts = [s["attempts"] for s in summary["shards"]]
    row.observed = (
        f"the job succeeded {healed_s:.0f} s after Postgres came back; attempts per shard {attempts}; "
        f"{counts['artifacts']} artifacts = {counts['objects']} objects for 8 items"
    )


def test_a_shard_that_kills_its_worker_fails_after_max_attempts(
    farm_factory, tiny_models, pg_database_factory, redis_url, fault_table
) -> None:
    row = fault_table.row(
        "Self-healing",
        "Poison shard: its render kills the worker process every time",
        "a prompt that makes the render SIGKILL its own process (tests/fixtures/faults); a supervisor restarts "
        "the GPU worker after each death; max_attempts 3",
        "after 3 deaths the shard fails for good with the reason; the job ends partial; the fleet keeps serving",
    )
    farm = farm_factory(
        broker=redis_url,
        db_url=pg_database_factory(),
        FARM_BROKER__VISIBILITY_TIMEOUT="20",
        FARM_WORKER__MAX_ATTEMPTS="3",
        # each death is noticed (the worker marked lost, its lease expired, the shard sent again)
        # while the supervisor's next worker starts, not several seconds after it is ready
        **{**FAST_RECOVERY, "FARM_WORKER__LOST_AFTER_S": "4"},
    )
    farm.start_worker(["farm.control"], name="control")
    deadly = {"FARM_TEST_KILL_PROMPT": "poison", "PYTHONPATH": os.pathsep.join([FAULTS, str(ROOT)])}
    deaths: list[str] = []
    stop = threading.Event()

    def supervise() -> None:  # systemd's Restart=always, for one GPU worker
        worker = farm.start_worker(["farm.gpu.sd15"], name="gpu-0", **deadly)
        while not stop.is_set():
            if worker.proc.poll() is not None:
                deaths.append(worker.name)
                worker = farm.start_worker(["farm.gpu.sd15"], name=f"gpu-{len(deaths)}", **deadly)
            time.sleep(0.2)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        with farm.client() as client:
            prompts = ["ok one", "poison pill", "ok two", "ok three"]
            job = client.submit(text_job(tiny_models["sd15"], steps=2, count=1, shard_size=1, prompts=prompts))
            summary = client.wait(job, timeout=300)
            counts = check_job_outputs(client, job)
    finally:
        stop.set()
        supervisor.join(timeout=60)
    assert summary["status"] == "partial", summary
    poison = summary["shards"][1]
    assert poison["status"] == "failed" and poison["attempts"] == 3
    assert poison["error"].startswith("worker process died 3 times on this shard (last: gpu-")
    assert [s["status"] for s in summary["shards"]] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert len(deaths) == 3, deaths
    assert counts["artifacts"] == counts["objects"] == 3
    row.observed = f"{len(deaths)} worker deaths, then: {poison['error']}; job partial, 3 of 4 items rendered once"


def test_reconcile_command_reports_a_pass(farm_factory, tmp_path: Path) -> None:
    """`farm reconcile` on the embedded farm: one pass, counted, as JSON."""
    import subprocess
    import sys

    farm = farm_factory()
    done = subprocess.run(
        [sys.executable, "-m", "farm", "reconcile", "--json"],
        env=farm.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["resent_waiting"] == 0 and "seconds" in report
