"""Operations with real worker processes: the registry and a killed worker, Prometheus metrics
after a known job, and the blocklist with a worker that always fails."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from sqlalchemy import func, select

from farm.worker.metrics import STAGES
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, Shard
from tests.fixtures.farm import ROOT, text_job
from tests.fixtures.services import free_port, wait_for


def _farm_cli(farm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm", *args], env=farm.env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def _workers(farm) -> dict[str, dict]:
    result = _farm_cli(farm, "workers", "--json")
    assert result.returncode == 0, result.stderr
    return {w["name"]: w for w in json.loads(result.stdout)}


@pytest.mark.integration
def test_registry_shows_workers_and_a_killed_one_goes_lost(farm_factory, tiny_models, pg_url, redis_url) -> None:
    """Leases of 120 s, but the dead worker is noticed after 3 s of silence and its lease expired
    then, so its shard is taken over as soon as Redis redelivers the message (10 s)."""
    farm = farm_factory(
        broker=redis_url,
        db_url=pg_url,
        FARM_BROKER__VISIBILITY_TIMEOUT="10",
        FARM_WORKER__LEASE_SECONDS="120",
        FARM_WORKER__LOST_AFTER_S="3",
    )
    farm.start_worker(["farm.control"], name="ops-control")
    victim = farm.start_worker(["farm.gpu.sd15"], name="ops-victim")
    listed = _workers(farm)
    assert listed["ops-control"]["status"] == listed["ops-victim"]["status"] == "online"
    assert listed["ops-victim"]["queues"] == ["farm.gpu.sd15"] and listed["ops-victim"]["device"] == "cpu"
    assert listed["ops-control"]["device"] == "none"  # control-only: no torch, no device

    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], steps=60, count=1, prompts=["a", "b"], shard_size=1))

        def victim_holds_a_shard() -> bool:
            with session_scope(factory) as s:
                held = s.scalar(select(func.count()).where(Shard.job_id == job_id, Shard.lease_owner == "ops-victim"))
            return bool(held) and (_workers(farm)["ops-victim"]["current_shard"] or {}).get("job_id") == str(job_id)

        wait_for(victim_holds_a_shard, 60, "the victim to hold a shard")
        pinned = [f"sd15:{tiny_models['sd15']}"]
        wait_for(lambda: _workers(farm)["ops-victim"]["pinned_models"] == pinned, 20, "the pinned model to show")
        victim.kill()
        wait_for(lambda: _workers(farm)["ops-victim"]["status"] == "lost", 30, "the victim to be shown lost")
        farm.start_worker(["farm.gpu.sd15"], name="ops-rescuer")
        summary = client.wait(job_id, timeout=90)  # well inside the 120 s lease: the sweep expired it
    assert summary["status"] == "succeeded", summary
    taken_over = [s for s in summary["shards"] if s["attempts"] > 1]
    assert taken_over and all(s["worker"] == "ops-rescuer" for s in taken_over)
    with session_scope(factory) as s:
        keys = s.scalars(select(Artifact.key).where(Artifact.job_id == job_id)).all()
    assert len(keys) == len(set(keys)) == 2
    engine.dispose()
    farm.stop()
    assert _workers(farm)["ops-rescuer"]["status"] == "stopped"  # a clean shutdown says so


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_worker_metrics_count_a_known_job(farm_factory, tiny_models) -> None:
    """3 shards of 2 items, shard 1 failing on purpose: the counters say exactly that."""
    port = free_port()
    farm = farm_factory()  # embedded: SQLite, local folder, filesystem broker
    farm.start_worker(
        ["farm.control", "farm.gpu.sd15"], FARM_WORKER__METRICS_PORT=str(port), FARM_WORKER__FAIL_SHARDS="[1]"
    )
    with farm.client() as client:
        summary = client.wait(client.submit(text_job(tiny_models["sd15"])), timeout=180)
    assert summary["status"] == "partial"
    queue = (("queue", "farm.gpu.sd15"),)
    m = _metrics(port)
    assert m[("farm_shards_total", (("outcome", "succeeded"), *queue))] == 2
    assert m[("farm_shards_total", (("outcome", "failed"), *queue))] == 1
    assert m[("farm_items_total", queue)] == 4
    assert m[("farm_model_loads_total", (("family", "sd15"),))] == 1
    assert m[("farm_model_cache_hits_total", (("family", "sd15"),))] == 1  # the failing shard fails before loading
    stages = {stage: m[("farm_shard_stage_seconds_count", (*queue, ("stage", stage)))] for stage in STAGES}
    assert stages == {"queue_wait": 3, "load": 2, "patch": 2, "denoise": 2, "upload": 2}  # shard 1 failed first
    assert m[("farm_patch_apply_seconds_count", queue)] == 2
    assert m[("farm_items_per_second", queue)] > 0


@pytest.mark.integration
def test_blocklist_with_a_worker_that_always_fails(farm_factory, tiny_models, pg_url, redis_url) -> None:
    """``ops-broken`` fails every shard (retryably). Alone, after 2 failures in a row it is
    blocked from the job, and with no other worker on the queue the job's shards fail with that
    reason. Retried once ``ops-healthy`` is up, the broken worker hands the shards back and the
    healthy one renders them; shard 0 fails on the healthy one too: having failed on 2 different
    workers it is FAILED for good, every error kept, though attempts were left."""
    farm = farm_factory(
        broker=redis_url,
        db_url=pg_url,
        FARM_WORKER__BLOCKLIST_AFTER="2",
        FARM_WORKER__MAX_WORKERS_PER_SHARD="2",
        FARM_WORKER__MAX_ATTEMPTS="8",
        FARM_WORKER__LOST_AFTER_S="10",
        FARM_WORKER__FAIL_SHARDS_RETRYABLE="true",
    )
    farm.start_worker(["farm.control"], name="ops-control")
    broken = farm.start_worker(
        ["farm.gpu.sd15"], name="ops-broken", FARM_WORKER__FAIL_SHARDS=json.dumps(list(range(6)))
    )
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], count=1, prompts=list("abcdef"), shard_size=1))
        alone = client.wait(job_id, timeout=120)
        assert alone["status"] == "failed", alone
        assert [b["worker"] for b in alone["blocked_workers"]] == ["ops-broken"]
        assert any("every live worker on farm.gpu.sd15 is blocked" in s["error"] for s in alone["shards"])

        farm.start_worker(["farm.gpu.sd15"], name="ops-healthy", FARM_WORKER__FAIL_SHARDS="[0]")
        retried = _farm_cli(farm, "retry", str(job_id))
        assert retried.returncode == 0 and "re-queued 6 failed shard(s)" in retried.stdout
        summary = client.wait(job_id, timeout=180)
    assert summary["status"] == "partial", summary
    (blocked,) = summary["blocked_workers"]
    assert blocked["worker"] == "ops-broken" and blocked["failures_in_a_row"] >= 2
    assert "injected fault" in blocked["last_error"]
    shards = {s["index"]: s for s in summary["shards"]}
    assert shards[0]["status"] == "failed" and shards[0]["attempts"] < 8
    assert shards[0]["failed_workers"] == ["ops-broken", "ops-healthy"]
    assert "failed on 2 different workers" in shards[0]["error"]
    assert {e.split(":")[0].split(" by ")[1] for e in shards[0]["errors"]} == {"ops-broken", "ops-healthy"}
    assert all(s["status"] == "succeeded" and s["worker"] == "ops-healthy" for i, s in shards.items() if i)
    assert "'outcome': 'rejected'" in broken.log.read_text()  # it handed shards back
    shown = _farm_cli(farm, "status", str(job_id))
    assert shown.returncode == 0 and "blocked: worker ops-broken" in " ".join(shown.stdout.split())
