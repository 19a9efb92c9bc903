"""The client through the front door: the same methods and results as the direct client (one
scenario run against both), and a person whose environment holds nothing but the API's URL and a
token submitting, waiting with progress and downloading the outputs through the ``farm`` CLI.

Real ``farm api`` and ``farm worker`` processes, a tiny model, Postgres and Redis."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from farm.errors import NotFound, UserError
from farm.job_spec import SpecError
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Job
from storage.objects import open_store
from tests.fixtures.api import add_person
from tests.fixtures.farm import ROOT, text_job

pytestmark = pytest.mark.integration
ALL_QUEUES = ["farm.control", "farm.gpu.sd15"]


@pytest.fixture(scope="module")
def running_farm(tmp_path_factory, tiny_models, pg_database_factory, redis_url):
    """One farm (Postgres, Redis, a worker, an API server) shared by the module's tests."""
    from storage import migrate
    from tests.fixtures.api import ApiServer
    from tests.fixtures.farm import Farm, _base_env

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
    deadline = time.monotonic() + 60
    while not (previews := client.previews(job, download=tmp_path / "out")).get("manifest_path"):
        assert time.monotonic() < deadline, previews  # the finalizer writes them just after the job ends
        time.sleep(0.2)
    assert json.loads(Path(previews["manifest_path"]).read_text())["job"]["id"] == str(job)
    assert Path(previews["contact_sheet_path"]).read_bytes().startswith(b"\x89PNG")

    assert job in [uuid.UUID(j["id"]) for j in client.list_jobs(limit=50)]
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
    listed = farm_cli("status")
    assert listed.returncode == 0 and job[:8] in listed.stdout
    cancelled = farm_cli("cancel", job[:8])
    assert cancelled.returncode == 0 and "already succeeded" in cancelled.stdout, cancelled.stdout
    workers = farm_cli("workers", "--json")
    assert workers.returncode == 0 and "api-worker" in workers.stdout
    refused = farm_cli("status", "0000000000")
    assert refused.returncode != 0 and "no job id starts with '0000000000'" in refused.stderr


def test_event_stream_shows_progress_while_the_job_renders(running_farm, tiny_models) -> None:
    """A watcher on ``/v1/jobs/{id}/events`` sees the job move while it renders (items done
    between none and all), then one ``end`` event with the final summary; a job of another
    project cannot be followed."""
    farm, server = running_farm
    owner = add_person(farm, server, "watcher", "member", project="studio")
    outsider = add_person(farm, server, "outsider", "member", project="elsewhere")
    with owner.client() as client:
        job = client.submit(text_job(tiny_models["sd15"], prompts=["a"], count=6, shard_size=1, steps=6))
    events: list[tuple[str, dict]] = []
    with outsider.http() as http:
        assert http.get(f"/v1/jobs/{job}/events").status_code == 404
    with owner.http() as http, http.stream("GET", f"/v1/jobs/{job}/events", timeout=240) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    names = [name for name, _ in events]
    assert names[-1] == "end" and names.count("end") == 1 and set(names[:-1]) == {"progress"}
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["items_done"] == 6
    during = [data["items_done"] for name, data in events if name == "progress"]
    assert any(0 < done < 6 for done in during), during  # seen while it happened, not only after
    assert during == sorted(during)


def test_bulk_through_the_api(running_farm, tiny_models, tmp_path) -> None:
    """``farm bulk submit``, ``status`` and ``export`` with only a token: the manifest travels in
    the request, the bulk job and its jobs are the submitter's, another project cannot see it."""
    farm, server = running_farm
    person = add_person(farm, server, "curator", "member", project="datasets")
    outsider = add_person(farm, server, "peeker", "member", project="elsewhere")
    base = tmp_path / "base.json"
    spec = text_job(tiny_models["sd15"], prompts=["a dataset image"], seeds=[1], steps=1, shard_size=5)
    spec.pop("base_seed"), spec.pop("count")
    base.write_text(json.dumps(spec))
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"row{i:03d}", "prompt": f"sample {i}"}) + "\n" for i in range(10)))
    env = {**person.env(), "COLUMNS": "60"}

    def farm_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "farm", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    submitted = farm_cli("bulk", "submit", str(manifest), "--base", str(base), "--name", "api-bulk")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    with person.client() as client:
        deadline = time.monotonic() + 180
        while client.bulk_status("api-bulk")["done"] < 10:
            assert time.monotonic() < deadline, client.bulk_status("api-bulk")
            time.sleep(0.5)
        assert {j["owner"] for j in client.list_jobs(limit=20, project="datasets")} == {"curator"}
    exported = tmp_path / "dataset.jsonl"
    done = farm_cli("bulk", "export", "api-bulk", "--out", str(exported))
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(json.loads(line)["row_id"] for line in exported.read_text().splitlines()) == [
        f"row{i:03d}" for i in range(10)
    ]
    with outsider.http() as http:
        assert http.get("/v1/bulk/api-bulk").status_code == 404
        assert http.get("/v1/bulk/api-bulk/export").status_code == 404
        row = json.dumps({"id": "row999", "prompt": "mine now"}) + "\n"
        taken = http.post("/v1/bulk", json={"name": "api-bulk", "base": spec, "manifest": row})
        assert taken.status_code == 403 and taken.json()["error"]["type"] == "Forbidden", taken.text


def test_input_files_are_checked_then_uploaded_alike(client, running_farm, tmp_path) -> None:
    """A spec naming input images by ``{"path": ...}``: the files are checked, the spec stored
    with content-addressed references and the bytes put in the farm's store, whichever way the
    client reaches the farm; a file that is not an image is refused before anything is sent."""
    farm, _ = running_farm
    shutil.copy(ROOT / "examples" / "lighthouse.png", tmp_path / "frame.png")
    (tmp_path / "fake.png").write_text("not an image")
    spec = yaml.safe_load((ROOT / "examples" / "temporal_video.yaml").read_text())
    spec.update(model="stabilityai/stable-video-diffusion-img2vid-xt", images=[{"path": "frame.png"}])
    (tmp_path / "video.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "fake.yaml").write_text(yaml.safe_dump({**spec, "images": [{"path": "fake.png"}]}))
    settings = farm.settings()
    store = open_store(settings.storage, settings.data_dir)
    before = sorted(info.key for info in store.list("inputs/"))

    with pytest.raises(UserError, match=r"fake\.png"):
        client.submit(tmp_path / "fake.yaml")
    assert sorted(info.key for info in store.list("inputs/")) == before

    job = client.submit(tmp_path / "video.yaml")  # no worker takes farm.gpu.svd here: it waits
    try:
        digest = hashlib.sha256((tmp_path / "frame.png").read_bytes()).hexdigest()
        key = f"inputs/sha256/{digest}.png"
        assert store.get_bytes(key) == (tmp_path / "frame.png").read_bytes()
        engine = make_engine(settings.database_url)
        with session_scope(make_session_factory(engine)) as session:
            stored = session.scalar(select(Job.spec).where(Job.id == job))
        engine.dispose()
        assert stored["images"] == [{"key": key, "sha256": digest, "name": "frame.png"}]
    finally:
        client.cancel(job)


def test_a_waiting_client_rides_out_an_api_server_killed_and_restarted(running_farm, tiny_models, tmp_path) -> None:
    """A drill nobody listed: the API process is SIGKILLed while a person's client waits on a
    rendering job, and comes back on the same port a few seconds later. The wait carries on and
    returns the finished job; the render itself never noticed (workers do not go through the API)."""
    import threading

    from tests.fixtures.api import ApiServer

    farm, _ = running_farm
    server = ApiServer(farm, tmp_path / "api.log").wait_ready()
    person = add_person(farm, server, "patient", "member", project="studio")
    result: dict = {}
    with person.client() as client:
        job = client.submit(text_job(tiny_models["sd15"], prompts=["a"], count=8, shard_size=1, steps=8))

        def wait() -> None:
            try:
                result["summary"] = client.wait(job, timeout=240)
            except Exception as exc:
                result["error"] = exc

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(1.0)
        server.kill()
        with farm.client() as direct:
            assert direct.get(job)["status"] in ("pending", "running"), "the job ended before the drill"
        time.sleep(3.0)
        restarted = ApiServer(farm, tmp_path / "api.log", port=server.port).wait_ready()
        try:
            waiter.join(240)
        finally:
            restarted.stop()
    assert "error" not in result, result.get("error")
    assert result["summary"]["status"] == "succeeded" and result["summary"]["items_done"] == 8
