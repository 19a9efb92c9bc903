"""Many workers on this machine: 4 worker processes over 3 GPU queues (Redis, Postgres,
SeaweedFS) and a mixed job set. Each shard runs exactly once, on a worker of its queue, and each
worker loads each model it serves once (pinned models stay warm)."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job, Shard
from tests.fixtures.farm import text_job
from tests.fixtures.services import free_port
from tests.test_operations import _metrics, _workers
from tests.test_temporal_video import _png, tiny_video_job

pytestmark = pytest.mark.integration

WORKERS = {  # name -> queues
    "many-sd15-a": ["farm.control", "farm.gpu.sd15"],
    "many-sd15-b": ["farm.gpu.sd15"],
    "many-sdxl": ["farm.gpu.sdxl"],
    "many-svd": ["farm.gpu.svd"],
}


def test_four_workers_three_queues_mixed_jobs(
    farm_factory, tiny_models, pg_url, redis_url, seaweedfs, tmp_path
) -> None:
    second_sd15 = tmp_path / "sd15-copy"  # another model path: another pipeline in the cache
    shutil.copytree(tiny_models["sd15"], second_sd15)
    image = tmp_path / "start.png"
    image.write_bytes(_png())
    farm = farm_factory(broker=redis_url, db_url=pg_url, s3=seaweedfs)
    ports = {}
    for name, queues in WORKERS.items():
        ports[name] = free_port()
        farm.start_worker(queues, name=name, FARM_WORKER__METRICS_PORT=str(ports[name]))
    specs = [
        text_job(tiny_models["sd15"], output_prefix="mix-a", shard_size=1),
        text_job(second_sd15, output_prefix="mix-b", shard_size=2),
        text_job(tiny_models["sdxl"], family="sdxl", output_prefix="mix-xl", shard_size=3),
        tiny_video_job(tiny_models["svd"], image, segments=1),
    ]
    with farm.client() as client:
        jobs = [client.submit(spec) for spec in specs]
        for job_id in jobs:
            assert client.wait(job_id, timeout=300)["status"] == "succeeded"
    listed = _workers(farm)
    engine = make_engine(pg_url)
    served: dict[str, set[str]] = defaultdict(set)
    with session_scope(make_session_factory(engine)) as s:
        rows = s.execute(
            select(Shard.queue, Shard.attempts, Shard.lease_owner, Job.spec).join(Job).where(Job.id.in_(jobs))
        ).all()
    engine.dispose()
    assert len(rows) == 6 + 3 + 2 + 2  # 6 items in shards of 1, 2, 3; two video clips
    for queue, attempts, owner, spec in rows:
        assert attempts == 1, (queue, owner)  # ran exactly once
        assert queue in WORKERS[owner] and queue in listed[owner]["queues"]
        served[owner].add(spec["model"])
    assert served["many-sdxl"] == {str(tiny_models["sdxl"])} and served["many-svd"] == {str(tiny_models["svd"])}
    for name in WORKERS:
        m = _metrics(ports[name])
        loads = sum(v for (metric, _), v in m.items() if metric == "farm_model_loads_total")
        assert loads == len(served[name]), (name, served[name])  # each model loaded once per worker
        assert sorted(p.split(":", 1)[1] for p in listed[name]["pinned_models"]) == sorted(served[name])
    assert served["many-sd15-a"] | served["many-sd15-b"] == {str(tiny_models["sd15"]), str(Path(second_sd15))}
