"""`farm users` and `farm tokens` as an administrator runs them: a real subprocess, through a pipe,
in a 60-column terminal, against the configured database (embedded SQLite, and Postgres)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import make_engine, make_session_factory, session_scope
from storage.identity import authenticate
from storage.models import ApiToken, AuditEvent
from tests.fixtures.farm import ROOT

TOKEN = re.compile(r"^pf_[0-9a-f]{32}_[A-Za-z0-9_-]{43}$")


def farm(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    clean.update({"PYTHONPATH": str(ROOT), "COLUMNS": "60", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "farm", *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=120
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def audit(url: str) -> list[tuple[str, str | None, str | None, dict]]:
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        rows = session.execute(
            select(AuditEvent.action, AuditEvent.actor, AuditEvent.target, AuditEvent.detail).order_by(AuditEvent.id)
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_users_and_tokens_through_a_pipe(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'farm-data' / 'farm.db'}"
    refused = farm(tmp_path, "users", "list")
    assert refused.returncode == 2 and "run `farm db upgrade` first" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    ok(farm(tmp_path, "db", "upgrade"))

    added = ok(farm(tmp_path, "users", "add", "alice", "--role", "member", "--project", "vfx", "--manager"))
    assert "created user alice (member), in project vfx as its manager" in added
    ok(farm(tmp_path, "users", "add", "bob", "--role", "viewer"))
    ok(farm(tmp_path, "users", "join", "bob", "vfx"))
    twice = farm(tmp_path, "users", "add", "alice", "--role", "viewer")
    assert twice.returncode == 2 and "error: user 'alice' already exists" in twice.stderr
    bad = farm(tmp_path, "users", "add", "no way", "--role", "member")
    assert bad.returncode == 2 and "user name 'no way'" in bad.stderr and "Traceback" not in bad.stderr

    users = ok(farm(tmp_path, "users", "list")).splitlines()
    assert users[0].split("\t") == ["name", "role", "projects", "tokens", "created"]
    rows = {line.split("\t")[0]: line.split("\t")[1:4] for line in users[1:]}
    assert rows == {
        "admin": ["admin", "default*", "0"],
        "alice": ["member", "vfx*", "0"],
        "bob": ["viewer", "vfx", "0"],
    }

    created = farm(tmp_path, "tokens", "create", "alice", "--name", "laptop", "--expires-days", "30")
    token = ok(created).strip()
    assert TOKEN.match(token), created.stdout  # alone on stdout: `TOKEN=$(farm tokens create ...)` works
    assert "cannot be shown again" in created.stderr and token not in created.stderr
    token_id = token[3:35]
    assert f"created token {token_id[:8]} (laptop) for alice; it expires" in created.stderr

    listed = ok(farm(tmp_path, "tokens", "list", "--user", "alice")).splitlines()
    assert listed[0].split("\t") == ["id", "user", "name", "state", "created", "expires", "last used"]
    cells = listed[1].split("\t")
    assert cells[:4] == [token_id[:8], "alice", "laptop", "active"] and cells[-1] == "never"
    assert token[36:] not in "".join(listed)

    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        assert authenticate(session, token).name == "alice"
        stored = session.scalar(select(ApiToken.secret_hash))
        assert token[36:] not in stored
    engine.dispose()

    revoked = ok(farm(tmp_path, "tokens", "revoke", token_id[:6]))
    assert f"revoked token {token_id[:8]} (laptop)" in revoked
    assert "already revoked" in ok(farm(tmp_path, "tokens", "revoke", token_id))
    assert ok(farm(tmp_path, "tokens", "list")).splitlines()[1].split("\t")[3] == "revoked"
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        assert authenticate(session, token) is None
    engine.dispose()
    unknown = farm(tmp_path, "tokens", "revoke", "ffffff")
    assert unknown.returncode == 1 and "no token id starts with 'ffffff'" in unknown.stderr

    events = audit(url)
    assert [e[0] for e in events] == ["user.create", "user.create", "user.join", "token.create", "token.revoke"]
    assert all(e[1] and e[3]["via"] == "cli" for e in events)  # the OS user, from the CLI
    assert events[3][2] == events[4][2] and events[3][2].replace("-", "") == token_id
    assert token[36:] not in repr(events)


@pytest.mark.integration
def test_tokens_on_postgres(tmp_path: Path, empty_pg_url: str) -> None:
    env = {"FARM_DB__URL": empty_pg_url}
    ok(farm(tmp_path, "db", "upgrade", env=env))
    ok(farm(tmp_path, "users", "add", "carol", "--role", "admin", env=env))
    token = ok(farm(tmp_path, "tokens", "create", "carol", env=env)).strip()
    engine = make_engine(empty_pg_url)
    with session_scope(make_session_factory(engine)) as session:
        principal = authenticate(session, token)
        assert principal is not None and principal.is_admin and "default" in principal.project_ids_by_name
    engine.dispose()
    assert [e[0] for e in audit(empty_pg_url)] == ["user.create", "token.create"]
