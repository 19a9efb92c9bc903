"""The client through the front door: the same methods and results as the direct client (one
scenario run against both), and a person whose environment holds nothing but the API's URL and a
token submitting, waiting with progress and downloading the outputs through the ``farm`` CLI.

Real ``farm api`` and ``farm worker`` processes, a tiny model, Postgres and Redis."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from farm.errors import NotFound, UserError
from farm.job_spec import SpecError
from tests.fixtures.api import add_person
from tests.fixtures.farm import ROOT, text_job

pytestmark = pytest.mark.integration
ALL_QUEUES = ["farm.control", "farm.gpu.sd15"]


@pytest.fixture(scope="module")
def running_farm(tmp_path_factory, tiny_models, pg_database_factory, redis_url):
    """One farm (Postgres, Redis, a worker, an API server) shared by the module's tests."""
    from tests.fixtures.api import ApiServer
    from tests.fixtures.farm import Farm, _base_env

    from storage import migrate

    tmp = tmp_path_factory.mktemp("api-farm")
    env = {**_base_env(tmp), "FARM_BROKER__URL": redis_url, "FARM_DB__URL": pg_database_factory()}
    farm = Farm(env, tmp)
    migrate.upgrade(farm.settings().database_url)
    farm.start_worker(ALL_QUEUES, name="api-worker")
    server = ApiServer(farm, tmp / "api.log").wait_ready()
    try:
        yield farm, server
    finally:
        server.stop()
        farm.stop()


@pytest.fixture(params=["direct", "api"])
def client(request, running_farm):
    farm, server = running_farm
    if request.param == "direct":
        c = farm.client()
    else:
        name = f"user-{request.node.name[-20:].strip('[]').replace('[', '-')}"[:60]
        c = add_person(farm, server, name.replace("]", ""), "member", project="studio").client()
    yield c
    c.close()


def test_same_methods_same_results(client, tiny_models, tmp_path) -> None:
    """Submit, wait with progress, results with downloads, previews, cancel, retry, workers,
    listing and the errors people see: alike whichever way the client reaches the farm."""
    seen: list[int] = []
    spec = text_job(tiny_models["sd15"], prompts=["a red cube"], count=2, shard_size=1)
    job = client.submit(spec)
    summary = client.wait(job, timeout=180, on_progress=lambda s: seen.append(s["items_done"]))
    assert summary["status"] == "succeeded" and summary["items_done"] == 2
    assert seen and seen[-1] == 2
    assert client.job_id(str(job)[:8]) == job
    assert client.get(job, shards="all")["shards_by_status"] == {"succeeded": 2}

    artifacts = client.results(job, tmp_path / "out")
    assert len(artifacts) == 2
    for artifact in artifacts:
        data = Path(artifact["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert data.startswith(b"\x89PNG")
    previews = client.previews(job, download=tmp_path / "out")
    assert json.loads(Path(previews["manifest_path"]).read_text())["job"]["id"] == str(job)
    assert Path(previews["contact_sheet_path"]).read_bytes().startswith(b"\x89PNG")

    assert job in [__import__("uuid").UUID(j["id"]) for j in client.list_jobs(limit=50)]
    assert client.retry(job)["requeued"] == 0
    assert client.cancel(job)["cancel"] == "already succeeded"
    assert any(w["name"] == "api-worker" for w in client.workers())

    with pytest.raises(SpecError) as refused:
        client.submit({**spec, "steps": 0, "width": 13})
    assert {field for field, _ in refused.value.problems} >= {"steps", "width"}
    with pytest.raises(NotFound):
        client.get("0123456789abcdef0123456789abcdef")
    with pytest.raises(UserError):
        client.job_id("zz")


def test_a_person_with_only_a_token_renders_through_the_cli(running_farm, tiny_models, tmp_path) -> None:
    """``farm submit --wait`` and ``farm results --download`` from a process whose environment
    names no database, broker or bucket: only FARM_API__URL and FARM_API__TOKEN."""
    farm, server = running_farm
    person = add_person(farm, server, "tokenholder", "member", project="studio")
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(text_job(tiny_models["sd15"], prompts=["a cube"], count=3, shard_size=1)))
    env = {**person.env(), "COLUMNS": "60", "FARM_DATA_DIR": str(tmp_path / "nowhere")}
    assert not [
        k for k in env if k.startswith("FARM_") and k not in {"FARM_API__URL", "FARM_API__TOKEN", "FARM_DATA_DIR"}
    ]

    def farm_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "farm", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
        )

    submitted = farm_cli("submit", str(spec_file), "--wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "succeeded" in submitted.stdout
    assert person.token not in submitted.stdout + submitted.stderr
    job = submitted.stdout.split("submitted job ", 1)[1].split()[0]
    fetched = farm_cli("results", job, "--download", str(tmp_path / "outputs"))
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    pngs = sorted((tmp_path / "outputs").rglob("*.png"))
    assert len([p for p in pngs if p.name != "contact_sheet.png"]) == 3
    assert not (tmp_path / "nowhere").exists(), "the client wrote a local farm: it must not need one"
    status = farm_cli("status", job)
    assert status.returncode == 0 and "succeeded" in status.stdout
