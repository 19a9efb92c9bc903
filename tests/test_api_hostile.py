"""The front door against what nobody should send: schemathesis generating requests from
``/openapi.json`` (no 5xx, every answer as the schema says), and hostile bodies (huge, deeply
nested, wrong types, traversal in names and keys) answered 4xx with nothing stored.

A real ``farm api`` process on the embedded default."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from tests.fixtures.api import add_person
from tests.fixtures.farm import text_job

pytestmark = pytest.mark.integration


@pytest.fixture
def front_door(farm_factory, api_server_factory):
    farm = farm_factory()
    server = api_server_factory(farm, FARM_API__MAX_BODY_MB="1")
    return farm, server, add_person(farm, server, "mallory", "member", project="red")


def _stored(farm) -> tuple[int, list[str]]:
    """Jobs in the database and objects in the store."""
    from sqlalchemy import func, select

    from storage.db import make_engine, make_session_factory, session_scope
    from storage.models import Job
    from storage.objects import open_store

    settings = farm.settings()
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            jobs = session.scalar(select(func.count()).select_from(Job))
    finally:
        engine.dispose()
    store = open_store(settings.storage, settings.data_dir)
    return jobs, sorted(info.key for info in store.list(""))


def _png(size: int = 16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def test_hostile_bodies_get_4xx_and_store_nothing(front_door, tiny_models) -> None:
    farm, _, mallory = front_door
    before = _stored(farm)
    spec = text_job(tiny_models["sd15"])
    with mallory.http() as http:
        cases = {
            "huge": http.post(
                "/v1/jobs",
                content=b'{"spec": {"x": "' + b"a" * (2 << 20) + b'"}}',
                headers={"Content-Type": "application/json"},
            ),
            "huge, chunked": http.post(
                "/v1/jobs",
                content=iter([b'{"spec": {"x": "'] + [b"a" * 65536] * 40 + [b'"}}']),
                headers={"Content-Type": "application/json"},
            ),
            "deep": http.post(
                "/v1/jobs",
                content=b'{"spec": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                headers={"Content-Type": "application/json"},
            ),
            "deep, within limits": http.post("/v1/jobs", json={"spec": {**spec, "prompts": _nested(400)}}),
            "model not on this host": http.post("/v1/jobs", json={"spec": {**spec, "model": "./nowhere"}}),
            "not json": http.post("/v1/jobs", content=b"\xff\xfe{", headers={"Content-Type": "application/json"}),
            "wrong types": http.post("/v1/jobs", json={"spec": {**spec, "steps": "many", "prompts": 7}}),
            "not an object": http.post("/v1/jobs", json=["spec"]),
            "extra field": http.post("/v1/jobs", json={"spec": spec, "owner": "root"}),
            "server path": http.post(
                "/v1/jobs", json={"spec": {**spec, "kind": "temporal_video", "image": {"path": "/etc/passwd"}}}
            ),
            "traversal prefix": http.post("/v1/jobs", json={"spec": {**spec, "output_prefix": "../../etc"}}),
            "input key elsewhere": http.post(
                "/v1/jobs", json={"spec": {**spec, "kind": "temporal_video", "image": {"key": "../farm.db"}}}
            ),
            "traversal object": http.get("/v1/jobs/0000/objects/../../farm.db"),
            "traversal encoded": http.get("/v1/jobs/0000/objects/%2e%2e%2f%2e%2e%2ffarm.db"),
            "input not an image": http.put(
                "/v1/inputs/" + hashlib.sha256(b"#!/bin/sh").hexdigest(),
                content=b"#!/bin/sh",
                headers={"Content-Type": "image/png"},
            ),
            "input digest lies": http.put(
                "/v1/inputs/" + "0" * 64, content=_png(), headers={"Content-Type": "image/png"}
            ),
            "input name traversal": http.put(
                "/v1/inputs/..%2f..%2fx", content=_png(), headers={"Content-Type": "image/png"}
            ),
            "input wrong type": http.put(
                "/v1/inputs/" + hashlib.sha256(_png()).hexdigest(),
                content=_png(),
                headers={"Content-Type": "text/html"},
            ),
            "priority type": http.patch("/v1/jobs/0000", json={"priority": "high"}),
            "bad cursor": http.get("/v1/jobs", params={"cursor": "x" * 90}),
            "bad status filter": http.get("/v1/jobs", params={"status": "exploded"}),
        }
    for name, answer in cases.items():
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:300])
        assert answer.headers["content-type"].startswith("application/json"), name
        assert "error" in answer.json(), name
    assert cases["huge"].status_code == 413 and cases["huge, chunked"].status_code == 413
    assert {p["field"] for p in cases["wrong types"].json()["error"]["problems"]} >= {"steps", "prompts"}
    assert _stored(farm) == before, "a refused request stored something"


def _nested(depth: int) -> list:
    value: list = ["deep"]
    for _ in range(depth):
        value = [value]
    return value


def test_an_uploaded_input_is_checked_then_stored_once(front_door) -> None:
    farm, _, mallory = front_door
    data = _png()
    digest = hashlib.sha256(data).hexdigest()
    with mallory.http() as http:
        first = http.put(f"/v1/inputs/{digest}", content=data, headers={"Content-Type": "image/png"})
        again = http.put(f"/v1/inputs/{digest}", content=data, headers={"Content-Type": "image/png"})
    assert first.status_code == 201, first.text
    assert first.json() == again.json() == {"key": f"inputs/sha256/{digest}.png", "sha256": digest}
    assert [k for k in _stored(farm)[1] if k.startswith("inputs/")] == [f"inputs/sha256/{digest}.png"]


def test_schemathesis_finds_no_server_error(front_door, tmp_path) -> None:
    """Requests generated from the OpenAPI document (examples, coverage and fuzzing phases):
    no 5xx, every response as the document says."""
    _, server, mallory = front_door
    checks = "not_a_server_error,response_schema_conformance,content_type_conformance"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            checks,
            "-H",
            f"Authorization: Bearer {mallory.token}",
            "--max-examples",
            "25",
            "--request-timeout",
            "20",
            "--generation-deterministic",
            "--phases",
            "examples,coverage,fuzzing",
            "--suppress-health-check",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # its cache of crashes goes there, not into the checkout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"(\d{3,}) generated, \1 passed", output), output[-3000:]  # hundreds of requests ran
    assert mallory.token not in output.replace(f"Bearer {mallory.token}", "")
    assert httpx.get(server.url + "/healthz").status_code == 200
