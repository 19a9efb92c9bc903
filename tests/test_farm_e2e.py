"""The farm end to end: real worker processes, real brokers, real databases and object stores."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image
from sqlalchemy import func, select

from farm.errors import UserError
from farm.specs import SpecError
from storage.db import make_engine
from storage.models import Job
from tests.fixtures.farm import text_job

ALL_QUEUES = ["farm.control", "farm.gpu.sd15", "farm.gpu.sdxl"]


def _check_complete_job(farm, job_id, items: int = 6, shards: int = 3) -> dict:
    with farm.client() as client:
        summary = client.wait(job_id, timeout=180)
        assert summary["status"] == "succeeded", summary
        assert summary["items_done"] == items and summary["shards_done"] == shards
        results = client.results(job_id)
        store = client.store
        assert len(results) == items
        assert len({r["key"] for r in results}) == items
        png = store.get_bytes(results[0]["key"])
        image = Image.open(io.BytesIO(png))
        assert image.size == (64, 64)
        params = json.loads(image.text["farm"])
        assert params["seed"] == results[0]["seed"] and params["steps"] == 3
        assert "Seed: " in image.text["parameters"]
        # The manifest and contact sheet are written once every shard is terminal.
        deadline = time.monotonic() + 30
        while not store.exists(f"tests/{job_id}/manifest.json") and time.monotonic() < deadline:
            time.sleep(0.2)
        manifest = json.loads(store.get_bytes(f"tests/{job_id}/manifest.json"))
        assert len(manifest["artifacts"]) == items and manifest["job"]["status"] == "succeeded"
        assert store.exists(manifest["contact_sheet"])
        for shard in summary["shards"]:
            assert {"queue_wait_s", "load_s", "denoise_s", "upload_s"} <= shard["timings"].keys()
        return summary


def test_embedded_job_end_to_end(farm_factory, tiny_models) -> None:
    farm = farm_factory()  # SQLite + local folder + filesystem broker
    farm.start_worker(ALL_QUEUES)
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"]))
    _check_complete_job(farm, job_id)


@pytest.mark.integration
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_job_on_real_services(broker, farm_factory, tiny_models, pg_url, seaweedfs, request) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    farm = farm_factory(broker=url, db_url=pg_url, s3=seaweedfs)
    farm.start_worker(ALL_QUEUES)
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], idempotency_key=f"e2e-{broker}-{time.time_ns()}"))
        summary = _check_complete_job(farm, job_id)
    assert all(s["worker"] for s in summary["shards"])


@pytest.mark.integration
def test_idempotent_resubmission_and_invalid_spec(farm_factory, tiny_models, pg_url, redis_url) -> None:
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    spec = text_job(tiny_models["sd15"], idempotency_key=f"idem-{time.time_ns()}")
    with farm.client() as client:
        first = client.submit(spec)
        assert client.submit(spec) == first
        with pytest.raises(UserError, match="idempotency_key"):
            client.submit({**spec, "steps": 4})
        engine = make_engine(pg_url)
        before = _count(engine, Job)
        with pytest.raises(SpecError) as info:
            client.submit({**spec, "width": 65, "colour": "red", "idempotency_key": None})
        assert "width: must be a multiple of 8" in str(info.value) and "colour: unknown field" in str(info.value)
        assert _count(engine, Job) == before  # nothing was written
        engine.dispose()


def _count(engine, model) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(model))


@pytest.mark.integration
def test_failing_shard_makes_the_job_partial(farm_factory, tiny_models, pg_url, redis_url) -> None:
    farm = farm_factory(broker=redis_url, db_url=pg_url, FARM_WORKER__FAIL_SHARDS="[1]")
    faulty = farm.start_worker(ALL_QUEUES, name="faulty")
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"]))
        summary = client.wait(job_id, timeout=180)
        assert summary["status"] == "partial"
        failed = [s for s in summary["shards"] if s["status"] == "failed"]
        assert [s["index"] for s in failed] == [1]
        assert "injected fault" in failed[0]["error"] and failed[0]["attempts"] == 1
        assert len(client.results(job_id)) == 4
        # The worker kept serving: a second job on the same worker also runs (and is partial again).
        assert client.wait(client.submit(text_job(tiny_models["sd15"])), timeout=180)["status"] == "partial"
        # `farm retry` on a healthy worker finishes the first job.
        faulty.stop()
        farm.start_worker(ALL_QUEUES, name="healthy", FARM_WORKER__FAIL_SHARDS="[]")
        assert client.retry_failed(job_id) == 1
        summary = client.wait(job_id, timeout=180)
        assert summary["status"] == "succeeded" and len(client.results(job_id)) == 6
        retried = summary["shards"][1]
        assert retried["attempts"] == 2 and retried["worker"] == "healthy" and retried["error"] is None
        assert "injected fault" in retried["errors"][0]


@pytest.mark.integration
def test_workers_only_take_their_own_queue(farm_factory, tiny_models, pg_url, redis_url) -> None:
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    farm.start_worker(["farm.control"], name="control")
    sd15 = farm.start_worker(["farm.gpu.sd15"], name="only-sd15")
    sdxl = farm.start_worker(["farm.gpu.sdxl"], name="only-sdxl")
    with farm.client() as client:
        a = client.submit(text_job(tiny_models["sd15"]))
        b = client.submit(text_job(tiny_models["sdxl"], family="sdxl"))
        for job_id, owner in ((a, sd15.name), (b, sdxl.name)):
            summary = client.wait(job_id, timeout=180)
            assert summary["status"] == "succeeded"
            assert {s["worker"] for s in summary["shards"]} == {owner}


@pytest.mark.integration
def test_cancel_stops_the_job(farm_factory, tiny_models, pg_url, redis_url) -> None:
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    farm.start_worker(ALL_QUEUES)
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], steps=40, shard_size=1))
        deadline = time.monotonic() + 60
        while client.get(job_id)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        client.cancel(job_id)
        summary = client.wait(job_id, timeout=120)
        assert summary["status"] == "cancelled"
        statuses = [s["status"] for s in summary["shards"]]
        assert "cancelled" in statuses and "running" not in statuses and "queued" not in statuses
        assert len(client.results(job_id)) < 6
