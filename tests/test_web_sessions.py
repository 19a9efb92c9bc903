"""The web dashboard's doors, in process (no browser, no worker): logging in by password or token,
the session cookie's flags, CSRF on every form and on cookie-only API changes, another project's
job as a 404 page, text from a job shown as text, ``farm users passwd``.

Jobs are written straight to the database (they wait: nothing renders them)."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from farm.api.app import create_api
from farm.client import FarmClient
from storage.db import make_engine, make_session_factory, session_scope
from storage.identity import create_token, create_user, ensure_project, get_user
from storage.logins import check_password, set_password
from storage.models import AuditEvent, Job, Shard, User, WebSession
from tests.fixtures.farm import ROOT

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def web(farm_factory):
    farm = farm_factory()
    settings = farm.settings()
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        create_user(session, "alice", "member", project="red")
        create_user(session, "bob", "member", project="blue")
        set_password(session, "alice", "correct horse")
        set_password(session, "bob", "battery staple")
        _, token = create_token(session, "alice")
    api = create_api(settings, FarmClient(settings, direct=True))
    with TestClient(api, base_url="http://testserver") as client:
        yield client, sessions, token, settings
    engine.dispose()


def add_job(sessions, owner: str, project: str, prompt: str = "a red cube", shards: int = 3) -> str:
    with session_scope(sessions) as session:
        user = get_user(session, owner)
        spec = {"kind": "text_to_image", "prompts": [prompt], "model": "/models/tiny", "family": "sd15"}
        job = Job(
            kind="text_to_image",
            family="sd15",
            status="running",
            spec=spec,
            spec_hash=uuid.uuid4().hex * 2,
            output_prefix=f"web-{owner}",
            owner_id=user.id,
            project_id=ensure_project(session, project).id,
            items_total=shards * 2,
            shards_total=shards,
        )
        session.add(job)
        for index in range(shards):
            session.add(Shard(job=job, index=index, queue="farm.gpu.sd15", status="queued", params={}, items_total=2))
        session.flush()
        return str(job.id)


def login(client: TestClient, name: str, password: str, next_page: str = "/jobs"):
    form = client.get(f"/login?next={next_page}")
    assert form.status_code == 200
    csrf = CSRF.search(form.text).group(1)
    return client.post(
        "/login", data={"name": name, "password": password, "csrf": csrf, "next": next_page}, follow_redirects=False
    )


def page_csrf(client: TestClient, path: str = "/jobs") -> str:
    return CSRF.search(client.get(path).text).group(1)


def test_password_login_sets_a_strict_httponly_cookie_and_logout_ends_it(web) -> None:
    client, sessions, _, _ = web
    assert client.get("/jobs", follow_redirects=False).headers["location"] == "/login?next=%2Fjobs"
    answer = login(client, "alice", "correct horse")
    assert answer.status_code == 303 and answer.headers["location"] == "/jobs"
    cookie = next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and v.startswith("farm_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    with session_scope(sessions) as session:  # only the hash is kept
        hashes = session.scalars(select(WebSession.id_hash)).all()
        assert len(hashes) == 1 and value not in hashes[0]
    page = client.get("/jobs")
    assert page.status_code == 200 and "alice" in page.text
    out = client.post("/logout", data={"csrf": page_csrf(client)}, follow_redirects=False)
    assert out.status_code == 303
    client.cookies.set("farm_session", value)  # the old cookie is worth nothing now
    assert client.get("/jobs", follow_redirects=False).status_code == 303
    with session_scope(sessions) as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions == ["web.login", "web.logout"]


def test_wrong_password_and_missing_login_csrf_are_refused(web) -> None:
    client, sessions, _, _ = web
    wrong = login(client, "alice", "wrong horse!")
    assert wrong.status_code == 401 and "did not work" in wrong.text
    assert login(client, "nobody", "correct horse").status_code == 401
    refused = client.post("/login", data={"name": "alice", "password": "correct horse"}, follow_redirects=False)
    assert refused.status_code == 403
    assert "farm_session" not in client.cookies
    with session_scope(sessions) as session:
        rows = session.execute(select(AuditEvent.action, AuditEvent.status)).all()
    assert [tuple(r) for r in rows] == [("web.login", 401), ("web.login", 401)]


def test_token_login_and_secure_cookie_behind_tls(farm_factory) -> None:
    farm = farm_factory(FARM_API__PUBLIC_URL="https://farm.example")
    settings = farm.settings()
    engine = make_engine(settings.database_url)
    with session_scope(make_session_factory(engine)) as session:
        create_user(session, "carol", "viewer", project="red")
        _, token = create_token(session, "carol")
    with TestClient(create_api(settings, FarmClient(settings, direct=True)), base_url="https://testserver") as client:
        csrf = CSRF.search(client.get("/login").text).group(1)
        answer = client.post("/login", data={"token": token, "csrf": csrf}, follow_redirects=False)
        assert answer.status_code == 303
        assert "Secure" in answer.headers["set-cookie"]
        assert "carol" in client.get("/jobs").text
    engine.dispose()


def test_pages_follow_the_projects_and_show_text_as_text(web) -> None:
    client, sessions, _, _ = web
    mine = add_job(sessions, "alice", "red", prompt="<script>alert(1)</script>")
    theirs = add_job(sessions, "bob", "blue")
    login(client, "alice", "correct horse")
    listed = client.get("/jobs").text
    assert mine in listed and theirs not in listed
    page = client.get(f"/jobs/{mine}")
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert page.text.count('data-status="queued"') == 3
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in (f"/jobs/{theirs}", f"/jobs/{theirs[:8]}"):
        hidden = client.get(path)
        assert hidden.status_code == 404 and "Not found" in hidden.text and "bob" not in hidden.text
    nobody = client.get(f"/jobs/{uuid.uuid4()}")  # the same answer as a job that does not exist
    assert nobody.status_code == 404 and "Not found" in nobody.text
    assert client.get(f"/jobs?q={mine[:8]}").text.count(f'value="{mine}"') == 1
    assert mine not in client.get("/jobs?status=succeeded").text
    assert client.get("/workers").status_code == 200
    assert client.get("/bulk").status_code == 200
    assert client.get("/static/farm.css").status_code == 200


def test_every_form_post_needs_the_csrf_token(web) -> None:
    client, sessions, _, _ = web
    job = add_job(sessions, "alice", "red")
    login(client, "alice", "correct horse")
    for path, data in [
        (f"/jobs/{job}/cancel", {}),
        (f"/jobs/{job}/retry", {}),
        (f"/jobs/{job}/priority", {"priority": "1"}),
        ("/jobs/actions", {"action": "cancel", "job": job}),
        ("/logout", {}),
    ]:
        for csrf in (None, "not-the-token"):
            sent = {**data, **({"csrf": csrf} if csrf else {})}
            assert client.post(path, data=sent, follow_redirects=False).status_code == 403, (path, csrf)
    with session_scope(sessions) as session:
        assert session.scalar(select(Job.status).where(Job.id == uuid.UUID(job))) == "running"
    csrf = page_csrf(client)
    done = client.post("/jobs/actions", data={"action": "cancel", "job": [job], "csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303 and "ok=1" in done.headers["location"]
    with session_scope(sessions) as session:
        assert session.scalar(select(Job.status).where(Job.id == uuid.UUID(job))) == "cancelled"


def test_the_api_takes_the_cookie_for_reading_and_the_csrf_header_for_changing(web) -> None:
    client, sessions, token, _ = web
    job = add_job(sessions, "alice", "red")
    theirs = add_job(sessions, "bob", "blue")
    login(client, "alice", "correct horse")
    assert client.get(f"/v1/jobs/{job}?shards=all").json()["shards_listed"] == 3
    assert client.get(f"/v1/jobs/{theirs}").status_code == 404
    refused = client.post(f"/v1/jobs/{job}/cancel")
    assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["error"]["message"]
    assert client.post(f"/v1/jobs/{job}/cancel", headers={"X-CSRF-Token": "nope"}).status_code == 403
    csrf = page_csrf(client)
    assert client.post(f"/v1/jobs/{job}/cancel", headers={"X-CSRF-Token": csrf}).status_code == 200
    client.cookies.clear()  # a bearer token needs no CSRF token, as before
    other = add_job(sessions, "alice", "red")
    answer = client.post(f"/v1/jobs/{other}/cancel", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200
    assert client.get(f"/v1/jobs/{other}").status_code == 401


def test_users_passwd_from_stdin_is_hashed_and_audited(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def farm(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "farm", *args], cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True
        )

    assert farm("db", "upgrade").returncode == 0
    assert farm("users", "add", "dora", "--role", "member").returncode == 0
    no_tty = farm("users", "passwd", "dora")
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    short = farm("users", "passwd", "dora", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "8 to 1024 characters" in short.stderr
    done = farm("users", "passwd", "dora", "--password-stdin", stdin="a long enough secret\n")
    assert done.returncode == 0 and "set the password of dora" in done.stdout, done.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'farm-data' / 'farm.db'}")
    with session_scope(make_session_factory(engine)) as session:
        stored = session.scalar(select(User.password_hash).where(User.name == "dora"))
        assert stored.startswith("$argon2id$") and "a long enough secret" not in stored
        assert check_password(session, "dora", "a long enough secret") is not None
        assert check_password(session, "dora", "a long enough secreT") is None
        audit = session.execute(select(AuditEvent.action, AuditEvent.target, AuditEvent.detail)).all()
    engine.dispose()
    assert ("user.passwd", "dora", {"via": "cli"}) in [tuple(row) for row in audit]


def test_workers_and_bulk_pages_keep_to_the_projects(web) -> None:
    from datetime import timedelta

    from storage.models import BulkJob, Worker, utcnow

    client, sessions, _, _ = web
    theirs = add_job(sessions, "bob", "blue")
    with session_scope(sessions) as session:
        bob = get_user(session, "bob")
        blue = ensure_project(session, "blue").id
        shard = session.scalar(select(Shard).where(Shard.job_id == uuid.UUID(theirs), Shard.index == 0))
        shard.status, shard.lease_owner, shard.progress = "running", "gpu-1", 0.5
        shard.lease_expires_at = utcnow() + timedelta(minutes=5)
        session.add(Worker(name="gpu-1", hostname="host-a", device="cuda:0", gpu_name="H100", queues=["farm.gpu.sd15"]))
        session.add(BulkJob(name="nightly-faces", base_spec={}, owner_id=bob.id, project_id=blue))
    login(client, "alice", "correct horse")
    workers = client.get("/workers").text
    assert "gpu-1" in workers and "H100" in workers and "busy (another project)" in workers
    assert theirs[:8] not in workers
    assert "nightly-faces" not in client.get("/bulk").text
    client.cookies.clear()
    login(client, "bob", "battery staple")
    workers = client.get("/workers").text
    assert f"/jobs/{theirs}" in workers and "50%" in workers
    bulk = client.get("/bulk").text
    assert "nightly-faces" in bulk and "0 remaining of 0 rows" in bulk


def test_sessions_end_on_expiry_on_disabling_and_on_a_new_password(web) -> None:
    from storage.identity import disable_user, principal_for
    from storage.logins import SESSION_LIFETIME, session_principal, start_session
    from storage.models import utcnow

    _, sessions, _, _ = web
    with session_scope(sessions) as session:
        cookie, csrf = start_session(session, principal_for(session, "alice"))
        found = session_principal(session, cookie)
        assert found is not None and found[0].name == "alice" and found[1] == csrf
        assert session_principal(session, cookie, now=utcnow() + SESSION_LIFETIME) is None
        assert session_principal(session, cookie + "x") is None
        set_password(session, "alice", "a brand new password")
        assert session_principal(session, cookie) is None
        cookie, _ = start_session(session, principal_for(session, "alice"))
        disable_user(session, "alice")
        assert session_principal(session, cookie) is None
        assert check_password(session, "alice", "a brand new password") is None


def test_users_passwd_asks_twice_at_a_terminal(tmp_path: Path) -> None:
    import os
    import pty

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for args in (["db", "upgrade"], ["users", "add", "erin", "--role", "viewer"]):
        subprocess.run([sys.executable, "-m", "farm", *args], cwd=tmp_path, env=env, check=True, capture_output=True)

    def at_a_terminal(first: str, second: str) -> tuple[str, int]:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the command with the pty as its terminal
            os.chdir(tmp_path)
            os.execve(sys.executable, [sys.executable, "-m", "farm", "users", "passwd", "erin"], env)
        seen = b""
        for prompt, answer in ((b"new password for erin: ", first), (b"again: ", second)):
            while prompt not in seen:
                seen += os.read(fd, 1024)
            os.write(fd, answer.encode() + b"\n")
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        return seen.decode(errors="replace"), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    said, code = at_a_terminal("first password", "second password")
    assert code == 2 and "the two passwords differ" in said and "first password" not in said
    said, code = at_a_terminal("same password", "same password")
    assert code == 0 and "set the password of erin" in said and "same password" not in said
