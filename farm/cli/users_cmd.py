"""``farm users`` and ``farm tokens``: who may use the farm's API, and their tokens.

They run against the configured database (direct mode), like ``farm db``: whoever can run them
on the control host is the farm's administrator. Every change is written to the audit log, with
the operating-system user who ran the command as its actor.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from farm.cli.common import console, err_console, settings
from farm.cli.jobs_cmd import print_rows
from farm.errors import ConfigError, UserError
from farm.webhooks import checked_url
from storage import migrate
from storage.audit import list_audit
from storage.db import make_engine, make_session_factory, session_scope
from storage.identity import (
    add_member,
    create_token,
    create_user,
    disable_user,
    find_token,
    list_tokens,
    list_users,
    record_audit,
    revoke_token,
)
from storage.logins import check_password_text, set_password
from storage.status import Role
from storage.webhook_outbox import rotate_webhook_secret, set_user_webhook_url, user_id_by_name

users_app = typer.Typer(help="Users of the farm API, their roles and projects.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens: create (shown once), list, revoke.", no_args_is_help=True)

SHOWN_ID = 8  # hex digits of a token id that tables print (`farm tokens revoke` takes 6 or more)


@contextmanager
def _session() -> Iterator[Session]:
    """One transaction on the configured database; a database the migrations have not reached
    yet is named as such."""
    cfg = settings()
    engine = make_engine(cfg.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            yield session
    except DBAPIError:
        if migrate.current(cfg.database_url) not in migrate.heads():
            raise ConfigError("the database is not up to date: run `farm db upgrade` first") from None
        raise
    finally:
        engine.dispose()


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in the environment nor the password database
        return "unknown"


def _audit(session: Session, action: str, target: str, **detail: Any) -> None:
    record_audit(session, None, action, target=target, actor=_os_user(), detail={"via": "cli", **detail})


def _when(iso: str | None, empty: str = "-") -> str:
    return iso[:16].replace("T", " ") if iso else empty


# -- users -------------------------------------------------------------------------------------
@users_app.command("add")
def add_user(
    name: str = typer.Argument(..., help="User name: letters, digits, '.', '_', '-' (at most 64)."),
    role: Role = typer.Option(
        ..., "--role", help="admin: everything; member: submit and change own jobs; viewer: look."
    ),
    project: str | None = typer.Option(None, "--project", help="Add the user to this project (created if missing)."),
    manager: bool = typer.Option(False, "--manager", help="The user manages --project: may change all its jobs."),
) -> None:
    """Create a user, optionally in a project."""
    with _session() as session:
        create_user(session, name, role, project=project, manager=manager)
        _audit(session, "user.create", name, role=role.value, project=project, manager=manager)
    where = f", in project {project}" + (" as its manager" if manager else "") if project else ""
    console.print(f"created user {name} ({role.value}){where}", highlight=False)


@users_app.command("passwd")
def passwd(
    name: str = typer.Argument(..., help="User name."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input (one line) instead of a prompt."
    ),
) -> None:
    """Set the user's password for the web dashboard (stored as an Argon2 hash; their web
    sessions end). Asked twice at a prompt, or read once from standard input."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise UserError("no terminal to ask for the password: pipe it in with --password-stdin")
        password = getpass.getpass(f"new password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the two passwords differ; nothing changed")
    check_password_text(password)
    with _session() as session:
        set_password(session, name, password)
        _audit(session, "user.passwd", name)
    console.print(f"set the password of {name}", highlight=False)


@users_app.command("join")
def join_project(
    name: str = typer.Argument(..., help="User name."),
    project: str = typer.Argument(..., help="Project name (created if missing)."),
    manager: bool = typer.Option(False, "--manager", help="The user manages the project: may change all its jobs."),
) -> None:
    """Add a user to a project, or set whether they manage it."""
    with _session() as session:
        add_member(session, name, project, manager=manager)
        _audit(session, "user.join", name, project=project, manager=manager)
    console.print(f"user {name} is in project {project}" + (" as its manager" if manager else ""), highlight=False)


@users_app.command("disable")
def disable(name: str = typer.Argument(..., help="User name.")) -> None:
    """Disable a user: their tokens stop working at once; their jobs stay theirs."""
    with _session() as session:
        disable_user(session, name)
        _audit(session, "user.disable", name)
    console.print(f"user {name} is disabled", highlight=False)


@users_app.command("set-webhook")
def set_webhook(
    name: str = typer.Argument(..., help="User name."),
    url: str = typer.Argument(..., help="http(s) URL their jobs' events go to when a spec names none; '' clears it."),
) -> None:
    """Set a user's default webhook URL. A user without a signing secret gets one, printed once
    alone on standard output."""
    cfg = settings()
    checked = checked_url(url, cfg.webhooks, "url") if url else None
    with _session() as session:
        made = set_user_webhook_url(session, user_id_by_name(session, name), checked)
        _audit(session, "webhook.set", name, url=checked, secret_made=made is not None)
    err_console.print(f"webhook of {name}: {checked or 'none'}", highlight=False)
    if made is not None:
        typer.echo(made)
        err_console.print("this is their new signing secret; it cannot be shown again: copy it now", highlight=False)


@users_app.command("webhook-secret")
def webhook_secret(name: str = typer.Argument(..., help="User name.")) -> None:
    """Make a new webhook signing secret for a user, printed once alone on standard output; the
    old one stops signing at once. The farm keeps it (it must sign with it)."""
    with _session() as session:
        secret = rotate_webhook_secret(session, user_id_by_name(session, name))
        _audit(session, "webhook.secret", name)
    typer.echo(secret)
    err_console.print(f"new webhook signing secret of {name}; it cannot be shown again: copy it now", highlight=False)


@users_app.command("list")
def users_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List users: role, projects (* marks the ones they manage), working tokens, created."""
    with _session() as session:
        users = list_users(session)
    if as_json:
        typer.echo(json.dumps(users, indent=2))
        return
    rows = [
        (
            u["name"],
            u["role"] + (" (disabled)" if u["disabled_at"] else ""),
            ", ".join(p["name"] + ("*" if p["manager"] else "") for p in u["projects"]) or "-",
            str(u["tokens"]),
            _when(u["created_at"]),
        )
        for u in users
    ]
    print_rows("users", ("name", "role", "projects", "tokens", "created"), rows)


# -- tokens ------------------------------------------------------------------------------------
@tokens_app.command("create")
def tokens_create(
    user: str = typer.Argument(..., help="The user the token acts as."),
    name: str | None = typer.Option(None, "--name", help="What the token is for, e.g. a host or a pipeline."),
    expires_days: int | None = typer.Option(None, "--expires-days", help="Stop working after this many days."),
) -> None:
    """Create an API token. The token is printed once, alone on standard output; the farm keeps
    only a hash of it."""
    with _session() as session:
        token, plaintext = create_token(session, user, name=name, expires_days=expires_days)
        _audit(session, "token.create", str(token.id), user=user, name=token.name, expires_days=expires_days)
        token_id, token_name, expires = token.id.hex, token.name, token.expires_at
    until = f"expires {_when(expires.isoformat())} UTC" if expires else "does not expire"
    err_console.print(f"created token {token_id[:SHOWN_ID]} ({token_name}) for {user}; it {until}", highlight=False)
    typer.echo(plaintext)
    err_console.print("this token cannot be shown again: copy it now", highlight=False)


@tokens_app.command("list")
def tokens_list(
    user: str | None = typer.Option(None, "--user", help="Only this user's tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List tokens (never the tokens themselves): id, user, name, state, created, expires, last used."""
    with _session() as session:
        tokens = list_tokens(session, user)
    if as_json:
        typer.echo(json.dumps(tokens, indent=2))
        return
    rows = [
        (
            t["id"].replace("-", "")[:SHOWN_ID],
            t["user"],
            t["name"],
            t["state"],
            _when(t["created_at"]),
            _when(t["expires_at"], "never"),
            _when(t["last_used_at"], "never"),
        )
        for t in tokens
    ]
    print_rows("tokens", ("id", "user", "name", "state", "created", "expires", "last used"), rows)


@tokens_app.command("revoke")
def tokens_revoke(token: str = typer.Argument(..., help="Token id, or its first 6 or more hex digits.")) -> None:
    """Revoke a token: it stops working at once. Revoking a revoked token changes nothing."""
    with _session() as session:
        row = find_token(session, token)
        if row.revoked_at is None:
            revoke_token(session, row.id)
            _audit(session, "token.revoke", str(row.id), name=row.name)
            said = f"revoked token {row.id.hex[:SHOWN_ID]} ({row.name})"
        else:
            when = _when(row.revoked_at.isoformat())
            said = f"token {row.id.hex[:SHOWN_ID]} ({row.name}) was already revoked, at {when} UTC"
    console.print(said, highlight=False)


# -- the audit log -----------------------------------------------------------------------------
def audit(
    actor: str | None = typer.Option(None, "--actor", help="Only this user (or OS user, for CLI changes)."),
    action: str | None = typer.Option(
        None, "--action", help="Only this action, e.g. job.cancel; job.* for all job actions."
    ),
    target: str | None = typer.Option(None, "--target", help="Only actions on this (a job id, a token id, ...)."),
    limit: int = typer.Option(50, "--limit", min=1, max=500, help="How many rows, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The audit log, newest first: who did what, on what, from where, and how it went (every
    state-changing API call, refused ones included, and every `farm users` / `farm tokens` change)."""
    with _session() as session:
        rows = list_audit(session, actor=actor, action=action, target=target, limit=limit)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    columns = ("when", "actor", "action", "target", "status", "from")
    shown = [
        (_when(r["at"]), r["actor"] or "-", r["action"], r["target"] or "-", str(r["status"]), r["remote"] or "-")
        for r in rows
    ]
    print_rows("audit log", columns, shown)


def register(app: typer.Typer) -> None:
    app.add_typer(users_app, name="users")
    app.add_typer(tokens_app, name="tokens")
    app.command()(audit)
