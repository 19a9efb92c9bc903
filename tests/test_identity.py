"""Users, projects, API tokens and the audit log (storage.identity), on real SQLite and Postgres.

Tokens: made once and shown once, only their hash stored; authentication takes a well-formed,
known, unrevoked, unexpired token of an enabled user and nothing else."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from storage import identity as ident
from storage.errors import AlreadyExists, FarmError, NotFound, Unauthorized, UserError
from storage.models import ApiToken, AuditEvent, User, utcnow
from storage.status import Role

TOKEN = re.compile(r"pf_[0-9a-f]{32}_[A-Za-z0-9_-]{43}")


@pytest.fixture
def tag() -> str:
    """A suffix that keeps names apart on the Postgres database the tests share."""
    return uuid.uuid4().hex[:8]


def test_the_default_identity_is_there_once(session) -> None:
    admin, project = ident.ensure_default_identity(session)
    again = ident.ensure_default_identity(session)
    assert (admin.name, admin.role, project.name) == ("admin", Role.ADMIN, "default")
    assert (again[0].id, again[1].id) == (admin.id, project.id)
    principal = ident.principal_for(session, "admin")
    assert principal.is_admin and principal.manages(project.id)
    assert principal.project_ids_by_name["default"] == project.id


def test_users_are_validated_and_unique(session, tag: str) -> None:
    user = ident.create_user(session, f"alice-{tag}", "member", project=f"vfx-{tag}", manager=True)
    assert user.role == Role.MEMBER
    principal = ident.principal_for(session, f"alice-{tag}")
    (project_id,) = principal.projects
    assert principal.project_ids_by_name == {f"vfx-{tag}": project_id} and principal.manages(project_id)
    with pytest.raises(AlreadyExists, match=f"user 'alice-{tag}' already exists") as raised:
        ident.create_user(session, f"alice-{tag}", Role.VIEWER)
    assert isinstance(raised.value, UserError) and isinstance(raised.value, ValueError)
    for bad in ("", "-x", ".x", "a b", "a/b", "x" * 65, "é", "a\n"):
        with pytest.raises(UserError, match="letters, digits"):
            ident.create_user(session, bad, Role.MEMBER)
    with pytest.raises(UserError, match="must be one of admin, member, viewer"):
        ident.create_user(session, f"bob-{tag}", "boss")
    with pytest.raises(UserError, match="needs a project"):
        ident.create_user(session, f"bob-{tag}", "member", manager=True)
    assert ident.create_user(session, "x" * 64, Role.VIEWER).name == "x" * 64


def test_members_and_the_user_list(session, tag: str) -> None:
    ident.create_user(session, f"carol-{tag}", Role.MEMBER, project=f"a-{tag}")
    ident.add_member(session, f"carol-{tag}", f"b-{tag}", manager=True)
    ident.add_member(session, f"carol-{tag}", f"a-{tag}", manager=True)  # the flag of an existing membership
    ident.add_member(session, f"carol-{tag}", f"a-{tag}")
    with pytest.raises(NotFound, match="no user 'nobody"):
        ident.add_member(session, f"nobody-{tag}", f"a-{tag}")
    ident.create_token(session, f"carol-{tag}")
    ident.revoke_token(session, ident.create_token(session, f"carol-{tag}")[0].id)
    (carol,) = [u for u in ident.list_users(session) if u["name"] == f"carol-{tag}"]
    assert carol["role"] == "member" and carol["disabled_at"] is None and carol["tokens"] == 1
    assert carol["projects"] == [{"name": f"a-{tag}", "manager": False}, {"name": f"b-{tag}", "manager": True}]
    json.dumps(carol)  # plain data


def test_a_token_is_shown_once_and_only_its_hash_is_stored(session, tag: str) -> None:
    ident.create_user(session, f"dan-{tag}", Role.MEMBER, project=f"p-{tag}")
    token, plaintext = ident.create_token(session, f"dan-{tag}", name="laptop")
    assert TOKEN.fullmatch(plaintext) and plaintext.startswith(f"pf_{token.id.hex}_")
    secret = plaintext.split("_", 2)[2]
    session.expire_all()
    stored = session.execute(select(ApiToken.__table__).where(ApiToken.id == token.id)).one()._asdict()
    assert stored["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in str(value) or plaintext in str(value) for value in stored.values())
    listed = ident.list_tokens(session, f"dan-{tag}")
    assert [t["name"] for t in listed] == ["laptop"] and listed[0]["state"] == "active"
    assert "secret_hash" not in listed[0] and stored["secret_hash"] not in json.dumps(listed)
    assert ident.create_token(session, f"dan-{tag}")[0].name == "token"


def test_token_lifecycle(session, tag: str) -> None:
    ident.create_user(session, f"erin-{tag}", Role.MEMBER, project=f"p-{tag}")
    t0 = utcnow()
    token, plaintext = ident.create_token(session, f"erin-{tag}", now=t0)

    principal = ident.authenticate(session, plaintext, now=t0)
    assert principal is not None
    assert (principal.name, principal.role, principal.token_id) == (f"erin-{tag}", Role.MEMBER, token.id)
    assert list(principal.project_ids_by_name) == [f"p-{tag}"] and not principal.is_admin
    session.expire_all()
    assert session.get(ApiToken, token.id).last_used_at == t0

    ident.authenticate(session, plaintext, now=t0 + timedelta(seconds=30))  # no write a minute long
    session.expire_all()
    assert session.get(ApiToken, token.id).last_used_at == t0
    ident.authenticate(session, plaintext, now=t0 + timedelta(minutes=2))
    session.expire_all()
    assert session.get(ApiToken, token.id).last_used_at == t0 + timedelta(minutes=2)

    assert ident.revoke_token(session, token.id.hex[:6], now=t0).revoked_at == t0
    assert ident.authenticate(session, plaintext, now=t0) is None  # at once
    assert ident.revoke_token(session, str(token.id)).revoked_at == t0  # again: nothing changes
    assert ident.list_tokens(session, f"erin-{tag}")[0]["state"] == "revoked"


def test_expired_tampered_and_disabled_tokens_are_refused(session, tag: str) -> None:
    ident.create_user(session, f"finn-{tag}", Role.VIEWER)
    t0 = utcnow()
    _, plaintext = ident.create_token(session, f"finn-{tag}", expires_days=1, now=t0)
    assert ident.authenticate(session, plaintext, now=t0 + timedelta(hours=23)) is not None
    assert ident.authenticate(session, plaintext, now=t0 + timedelta(days=1, seconds=1)) is None
    assert ident.list_tokens(session, f"finn-{tag}")[0]["state"] == "active"  # as of now, not of the test's clock

    _, other = ident.create_token(session, f"finn-{tag}")
    head, secret = other[:36], other[36:]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert ident.authenticate(session, head + flipped) is None
    assert ident.authenticate(session, plaintext[:36] + secret) is None  # another token's secret
    assert ident.authenticate(session, f"pf_{uuid.uuid4().hex}_{secret}") is None  # unknown id
    assert ident.authenticate(session, other) is not None

    ident.disable_user(session, f"finn-{tag}")
    assert ident.authenticate(session, other) is None
    with pytest.raises(Unauthorized, match="disabled"):
        ident.principal_for(session, f"finn-{tag}")
    with pytest.raises(UserError, match="disabled"):
        ident.create_token(session, f"finn-{tag}")


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "pf_",
        "pf_" + "0" * 32,
        "pf_" + "0" * 32 + "_",
        "pf_" + "g" * 32 + "_" + "a" * 43,
        "pf_" + "A" * 32 + "_" + "a" * 43,
        "PF_" + "0" * 32 + "_" + "a" * 43,
        "pf_" + "0" * 31 + "_" + "a" * 43,
        "pf_" + "0" * 32 + "_" + "a" * 43 + "!",
        "pf_" + "0" * 32 + "_" + "a b" * 20,
        "Bearer pf_" + "0" * 32 + "_" + "a" * 43,
        "pf_" + "0" * 32 + "_" + "a" * 10_000,
        "x" * 100_000,
        "\x00",
    ],
)
def test_malformed_tokens_are_none(session, presented: str) -> None:
    assert ident.parse_token(presented) is None
    assert ident.authenticate(session, presented) is None


def test_an_unknown_token_is_compared_all_the_same(session, monkeypatch, tag: str) -> None:
    """The hash comparison runs whether or not the id is known, so timing does not tell."""
    compared: list[tuple[str, str]] = []
    real = ident.hmac.compare_digest
    monkeypatch.setattr(ident.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert ident.authenticate(session, f"pf_{uuid.uuid4().hex}_{'a' * 43}") is None
    assert len(compared) == 1 and len(compared[0][1]) == 64


def test_tokens_are_named_by_id_or_a_unique_prefix(session, tag: str) -> None:
    user = ident.create_user(session, f"gus-{tag}", Role.MEMBER)
    stem = uuid.uuid4().hex[:10]
    rows = [
        ApiToken(id=uuid.UUID(stem + suffix + "0" * 20), user_id=user.id, name="t", secret_hash="0" * 64)
        for suffix in ("aa", "ab")
    ]
    session.add_all(rows)
    session.flush()
    assert ident.find_token(session, stem + "aa").id == rows[0].id
    assert ident.find_token(session, str(rows[1].id).upper()).id == rows[1].id
    assert ident.find_token(session, f"pf_{rows[1].id.hex}_whatever").id == rows[1].id
    with pytest.raises(UserError, match="ambiguous"):
        ident.revoke_token(session, stem + "a")
    with pytest.raises(UserError, match="at least its first 6 hex digits"):
        ident.revoke_token(session, stem[:5])
    with pytest.raises(UserError, match="at least its first 6 hex digits"):
        ident.revoke_token(session, "not-hex!")
    with pytest.raises(NotFound, match="no token id starts with"):
        ident.revoke_token(session, uuid.uuid4().hex)
    with pytest.raises(NotFound):
        ident.list_tokens(session, f"nobody-{tag}")


def test_audit_rows_hold_who_what_and_never_a_secret(session, tag: str) -> None:
    ident.create_user(session, f"hana-{tag}", Role.MEMBER, project=f"p-{tag}")
    token, plaintext = ident.create_token(session, f"hana-{tag}")
    principal = ident.authenticate(session, plaintext)
    event = ident.record_audit(
        session,
        principal,
        "job.submit",
        target="1234",
        remote="10.0.0.7",
        status=201,
        detail={"note": f"sent {plaintext}", "secret": "x", "nested": {"password": "y", "n": [plaintext]}},
    )
    cli = ident.record_audit(session, None, "token.create", target="t" * 300, actor="root", detail={"via": "cli"})
    session.flush()
    session.expire_all()
    row = session.get(AuditEvent, event.id)
    assert (row.actor, row.actor_id, row.token_id, row.action, row.target, row.remote, row.status) == (
        f"hana-{tag}",
        principal.user_id,
        token.id,
        "job.submit",
        "1234",
        "10.0.0.7",
        201,
    )
    assert row.at is not None and plaintext not in json.dumps(row.detail)
    assert row.detail == {"note": "sent pf_***", "secret": "***", "nested": {"password": "***", "n": ["pf_***"]}}
    other = session.get(AuditEvent, cli.id)
    assert (other.actor, other.actor_id, len(other.target), other.detail) == ("root", None, 256, {"via": "cli"})
    assert session.scalar(select(User.name).where(User.id == row.actor_id)) == f"hana-{tag}"


def test_errors_are_farm_errors_that_are_not_retryable() -> None:
    from farm import errors as farm_errors
    from storage.errors import Forbidden

    for cls in (Unauthorized, Forbidden, AlreadyExists):
        assert issubclass(cls, FarmError) and not cls("x").retryable
        assert getattr(farm_errors, cls.__name__) is cls
    assert not issubclass(Unauthorized, ValueError) and not issubclass(Forbidden, ValueError)
