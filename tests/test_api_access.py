"""The front door's rules, as people meet them over HTTP: two projects that cannot see each other,
viewers who only read, members who change only their own jobs unless they manage the project,
admins who do everything, and an audit row for every state-changing call (refused ones too).

A real ``farm api`` process on a free loopback port, on the embedded default and on Postgres;
no worker: jobs wait, which is all the rules need."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures.api import add_person
from tests.fixtures.farm import text_job

pytestmark = pytest.mark.integration


@pytest.fixture(params=["embedded", "postgres"])
def farm(request, farm_factory):
    if request.param == "embedded":
        return farm_factory()
    return farm_factory(db_url=request.getfixturevalue("pg_database_factory")())  # its own: user names are unique


def _audit(farm) -> list[tuple[str, str, int]]:
    from sqlalchemy import select

    from storage.models import AuditEvent

    with farm.session() as session:
        rows = session.execute(select(AuditEvent.actor, AuditEvent.action, AuditEvent.status).order_by(AuditEvent.id))
        return [tuple(row) for row in rows]


def test_projects_are_walled_off_and_roles_hold(farm, api_server_factory, tiny_models) -> None:
    server = api_server_factory(farm)
    alice = add_person(farm, server, "alice", "member", project="red")
    dave = add_person(farm, server, "dave", "member", project="red")
    erin = add_person(farm, server, "erin", "member", project="red", manager=True)
    carol = add_person(farm, server, "carol", "viewer", project="red")
    bob = add_person(farm, server, "bob", "member", project="blue")
    root = add_person(farm, server, "root", "admin", project="default")
    spec = text_job(tiny_models["sd15"])

    with alice.http() as http:
        first = http.post("/v1/jobs", json={"spec": spec})
        assert first.status_code == 201, first.text
        job = first.json()["job_id"]
        second = http.post("/v1/jobs", json={"spec": {**spec, "output_prefix": "second"}}).json()["job_id"]
        assert http.get(f"/v1/jobs/{job}").json()["owner"] == "alice"

    # Another project: every door answers as if the job did not exist, by id and by prefix.
    with bob.http() as http:
        for method, path in [
            ("GET", f"/v1/jobs/{job}"),
            ("GET", f"/v1/jobs/{job[:8]}"),
            ("POST", f"/v1/jobs/{job}/cancel"),
            ("POST", f"/v1/jobs/{job}/retry"),
            ("PATCH", f"/v1/jobs/{job}"),
            ("GET", f"/v1/jobs/{job}/results"),
            ("GET", f"/v1/jobs/{job}/previews"),
            ("GET", f"/v1/jobs/{job}/events"),
            ("GET", f"/v1/jobs/{job}/objects/tests/{job}/manifest.json"),
        ]:
            answer = http.request(method, path, json={"priority": 1} if method == "PATCH" else None)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["type"] == "NotFound"
        assert http.get("/v1/jobs").json()["jobs"] == []
        assert http.get("/v1/jobs", params={"project": "red"}).json()["jobs"] == []

    # The viewer reads and changes nothing.
    with carol.http() as http:
        assert http.get(f"/v1/jobs/{job}").status_code == 200
        assert {j["id"] for j in http.get("/v1/jobs").json()["jobs"]} == {job, second}
        refused = http.post(f"/v1/jobs/{job}/cancel")
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "Forbidden"
        assert http.post("/v1/jobs", json={"spec": spec}).status_code == 403

    # A member of the project changes only their own; the project's manager changes any.
    with dave.http() as http:
        assert http.post(f"/v1/jobs/{job}/cancel").status_code == 403
        assert http.patch(f"/v1/jobs/{job}", json={"priority": 2}).status_code == 403
    with erin.http() as http:
        cancelled = http.post(f"/v1/jobs/{job}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["cancel"] == "cancelled"
    with alice.http() as http:
        too_high = http.patch(f"/v1/jobs/{second}", json={"priority": 9})
        assert too_high.status_code == 403, too_high.text
        assert http.patch(f"/v1/jobs/{second}", json={"priority": 3}).json()["priority"] == 3

    # The admin sees every project and may set any priority.
    with root.http() as http:
        assert {j["id"] for j in http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]} >= {job, second}
        assert http.patch(f"/v1/jobs/{second}", json={"priority": 9}).json()["priority"] == 9
        mine = http.get("/v1/jobs", params={"owner": "alice", "status": ["cancelled"]}).json()["jobs"]
        assert [j["id"] for j in mine] == [job]

    audit = _audit(farm)
    assert ("alice", "job.submit", 201) in audit
    assert ("carol", "job.cancel", 403) in audit
    assert ("carol", "job.submit", 403) in audit
    assert ("dave", "job.cancel", 403) in audit
    assert ("erin", "job.cancel", 200) in audit
    assert ("alice", "job.priority", 403) in audit
    assert ("root", "job.priority", 200) in audit
    assert ("bob", "job.cancel", 404) in audit
    assert not [row for row in audit if row[0] not in {"alice", "bob", "carol", "dave", "erin", "root"}]

    # The log is read by admins: through the API, and on the control host with `farm audit`.
    with root.http() as http:
        cancels = http.get("/v1/audit", params={"action": "job.cancel"}).json()
        newest_first = [("erin", 200), ("dave", 403), ("carol", 403), ("bob", 404)]
        assert [(r["actor"], r["status"]) for r in cancels] == newest_first
        assert all(r["remote"] == "127.0.0.1" and r["target"] for r in cancels)
        page = http.get("/v1/audit", params={"action": "job.*", "limit": 2}).json()
        older = http.get("/v1/audit", params={"action": "job.*", "before": page[-1]["id"]}).json()
        assert len(page) == 2 and older and older[0]["id"] < page[-1]["id"]
    with alice.http() as http:
        assert http.get("/v1/audit").status_code == 403
    shown = subprocess.run(
        [sys.executable, "-m", "farm", "audit", "--action", "job.cancel"],
        env={**farm.env, "COLUMNS": "60"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=farm.tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split("\t") == ["when", "actor", "action", "target", "status", "from"]
    assert [line.split("\t")[1] for line in lines[1:]] == ["erin", "dave", "carol", "bob"]


def test_tokens_are_checked_on_every_request(farm, api_server_factory) -> None:
    """No token, a made-up one, a tampered one: 401. A revoked token stops at once."""
    import httpx

    from storage.identity import list_tokens, revoke_token

    server = api_server_factory(farm)
    alice = add_person(farm, server, "alice", "member", project="red")
    assert httpx.get(server.url + "/v1/jobs").status_code == 401
    for bad in ("nonsense", alice.token[:-2] + "xx", "pf_" + "0" * 32 + "_" + "a" * 43, "Bearer " + "x" * 5000):
        answer = httpx.get(server.url + "/v1/jobs", headers={"Authorization": f"Bearer {bad}"})
        assert answer.status_code == 401, bad[:40]
        assert answer.json()["error"]["type"] == "Unauthorized"
        assert alice.token not in answer.text
    with alice.http() as http:
        assert http.get("/v1/me").json()["name"] == "alice"
        with farm.session() as session:
            (token,) = list_tokens(session, "alice")
            revoke_token(session, str(token["id"]))
        assert http.get("/v1/me").status_code == 401
        assert http.get("/v1/jobs").status_code == 401


def test_submissions_are_rate_limited_per_token_and_nothing_leaks(
    farm_factory, api_server_factory, tiny_models
) -> None:
    """Past ``api.submit_per_minute`` a token gets 429 with Retry-After (another token is not
    slowed); no token appears in the server's log, its metrics or the audit table; CORS is off."""
    import httpx

    farm = farm_factory()
    server = api_server_factory(farm, FARM_API__SUBMIT_PER_MINUTE="2")
    alice = add_person(farm, server, "alice", "member", project="red")
    bob = add_person(farm, server, "bob", "member", project="red")
    spec = text_job(tiny_models["sd15"])
    with alice.http() as http:
        answers = [http.post("/v1/jobs", json={"spec": {**spec, "base_seed": i}}) for i in range(3)]
        assert [a.status_code for a in answers] == [201, 201, 429]
        assert answers[2].json()["error"]["type"] == "RateLimited"
        assert 0 < float(answers[2].headers["Retry-After"]) <= 60
        preflight = http.options(
            "/v1/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers
        metrics = httpx.get(server.url + "/metrics").text
    with bob.http() as http:
        assert http.post("/v1/jobs", json={"spec": spec}).status_code == 201
    assert 'route="/v1/jobs",status="429"' in metrics
    assert not [a for a in answers[:2] if a.json()["job_id"] in metrics]  # routes are counted by template
    assert ("alice", "job.submit", 429) in _audit(farm)
    server.stop()
    everything = server.log.read_text(errors="replace") + metrics + repr(_audit_details(farm))
    for person in (alice, bob):
        secret = person.token.split("_", 2)[2]  # pf_<id>_<secret>; the secret may hold "_"
        assert secret not in everything and person.token not in everything


def _audit_details(farm) -> list:
    from sqlalchemy import select

    from storage.models import AuditEvent

    with farm.session() as session:
        return [tuple(r) for r in session.execute(select(AuditEvent.target, AuditEvent.detail, AuditEvent.remote))]


def test_stopping_the_server_ends_open_event_streams(farm_factory, api_server_factory, tiny_models) -> None:
    """An event stream on a job that is not moving stays open with keep-alives; a server told to
    stop (SIGTERM) still stops within its grace period, and the watcher's stream ends."""
    import threading
    import time

    farm = farm_factory()
    server = api_server_factory(farm)
    alice = add_person(farm, server, "alice", "member", project="red")
    with alice.http() as http:
        job = http.post("/v1/jobs", json={"spec": text_job(tiny_models["sd15"])}).json()["job_id"]
    lines: list[str] = []
    opened = threading.Event()

    def watch() -> None:
        try:
            with alice.http() as http, http.stream("GET", f"/v1/jobs/{job}/events", timeout=60) as stream:
                for line in stream.iter_lines():
                    lines.append(line)
                    opened.set()
        except Exception as exc:  # the server went away: the stream ended
            lines.append(f"ended: {type(exc).__name__}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert opened.wait(30) and lines[0] == "event: progress"
    started = time.monotonic()
    server.stop()
    assert server.proc.returncode is not None and time.monotonic() - started < 12
    watcher.join(15)
    assert not watcher.is_alive(), "the watcher's stream did not end with the server"
