"""Who uses the farm: users, projects, API tokens, the principal a request acts as, and the audit log.

Tokens read ``pf_<token id as 32 hex>_<secret>``. The token is shown once, when it is made; the
``api_token`` row keeps only the SHA-256 (hex) of the secret, so a copy of the database gives no
one a working token. :func:`authenticate` turns a presented token into a :class:`Principal` (or
``None``); what a principal may do is decided in :mod:`storage.access` only.

Like every storage function these take a session and never commit: the caller owns the
transaction (:func:`authenticate` may update ``last_used_at``; commit it or not).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, cast, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.errors import AlreadyExists, NotFound, Unauthorized, UserError
from storage.models import ApiToken, AuditEvent, Project, ProjectMember, User, utcnow
from storage.status import Role

DEFAULT_USER = "admin"
DEFAULT_PROJECT = "default"
NAME_MAX = 64
TOKEN_PREFIX = "pf_"  # noqa: S105 (the tokens' visible prefix, not a secret)
MIN_TOKEN_REF = 6  # hex digits of a token id that `revoke_token` accepts
MAX_EXPIRES_DAYS = 3650
LAST_USED_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often per token

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TOKEN = re.compile(r"pf_([0-9a-f]{32})_([A-Za-z0-9_-]{20,128})")
_HEX = re.compile(r"[0-9a-f]+")
_DUMMY_HASH = hashlib.sha256(b"no such token").hexdigest()  # compared against when the id is unknown


@dataclass(frozen=True)
class Principal:
    """The user a request acts as, with their memberships as of authentication.

    ``projects`` maps a project id to whether the principal manages it; ``project_ids_by_name``
    names the same projects. For an admin both hold every project (managed). ``token_id`` is the
    token that authenticated the request (``None`` in direct mode)."""

    user_id: uuid.UUID
    name: str
    role: Role
    projects: Mapping[uuid.UUID, bool] = field(default_factory=dict)
    project_ids_by_name: Mapping[str, uuid.UUID] = field(default_factory=dict)
    token_id: uuid.UUID | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    @property
    def is_viewer(self) -> bool:
        return self.role == Role.VIEWER

    def member_of(self, project_id: uuid.UUID) -> bool:
        return project_id in self.projects

    def manages(self, project_id: uuid.UUID) -> bool:
        return bool(self.projects.get(project_id, False))


# -- users and projects ------------------------------------------------------------------------
def check_name(name: str, what: str = "name") -> str:
    """``name`` when it is a valid user or project name (1-64 letters, digits, ``._-``, starting
    with a letter or digit); otherwise a :class:`UserError` saying so."""
    if not isinstance(name, str) or len(name) > NAME_MAX or _NAME.fullmatch(name) is None:
        shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
        raise UserError(
            f"{what} {shown}: use 1-{NAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise UserError(f"role {str(role)[:40]!r}: must be one of {known}") from None


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name[:80]!r}")
    return user


def ensure_project(session: Session, name: str) -> Project:
    """The project ``name``, created when missing."""
    check_name(name, "project name")
    project = session.scalar(select(Project).where(Project.name == name))
    if project is not None:
        return project
    project = Project(id=uuid.uuid4(), name=name)
    try:
        with session.begin_nested():
            session.add(project)
    except IntegrityError:  # created meanwhile by another session
        project = session.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise
    return project


def ensure_default_identity(session: Session) -> tuple[User, Project]:
    """The user ``admin`` and the project ``default`` (created when missing, admin a manager of
    it): who a submit is recorded as in direct mode (the admin on the control host)."""
    user = session.scalar(select(User).where(User.name == DEFAULT_USER))
    if user is None:
        user = User(id=uuid.uuid4(), name=DEFAULT_USER, role=Role.ADMIN)
        try:
            with session.begin_nested():
                session.add(user)
        except IntegrityError:
            user = get_user(session, DEFAULT_USER)
    project = ensure_project(session, DEFAULT_PROJECT)
    _ensure_member(session, user.id, project.id, manager=True, only_if_missing=True)
    return user, project


def create_user(
    session: Session, name: str, role: Role | str, *, project: str | None = None, manager: bool = False
) -> User:
    """A new user; with ``project`` (a name, created when missing) also a member of it."""
    check_name(name, "user name")
    role = parse_role(role)
    if manager and project is None:
        raise UserError("a manager needs a project to manage")
    if project is not None:
        check_name(project, "project name")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AlreadyExists(f"user {name!r} already exists")
    user = User(id=uuid.uuid4(), name=name, role=role)
    try:
        with session.begin_nested():
            session.add(user)
    except IntegrityError:
        raise AlreadyExists(f"user {name!r} already exists") from None
    if project is not None:
        _ensure_member(session, user.id, ensure_project(session, project).id, manager=manager)
    return user


def add_member(session: Session, user_name: str, project_name: str, *, manager: bool = False) -> ProjectMember:
    """Make the user a member of the project (created when missing); an existing membership gets
    the ``manager`` flag given."""
    user = get_user(session, user_name)
    return _ensure_member(session, user.id, ensure_project(session, project_name).id, manager=manager)


def _ensure_member(
    session: Session, user_id: uuid.UUID, project_id: uuid.UUID, *, manager: bool, only_if_missing: bool = False
) -> ProjectMember:
    member = session.get(ProjectMember, (user_id, project_id))
    if member is None:
        member = ProjectMember(user_id=user_id, project_id=project_id, manager=manager)
        try:
            with session.begin_nested():
                session.add(member)
            return member
        except IntegrityError:  # added meanwhile by another session
            member = session.get(ProjectMember, (user_id, project_id), populate_existing=True)
            if member is None:
                raise
    if not only_if_missing:
        member.manager = manager
    return member


def disable_user(session: Session, name: str, now: datetime | None = None) -> User:
    """Disable the user: their tokens stop working at once (their jobs stay theirs)."""
    user = get_user(session, name)
    if user.disabled_at is None:
        user.disabled_at = now or utcnow()
    return user


def list_users(session: Session) -> list[dict[str, Any]]:
    """Every user as plain data: name, role, disabled_at, projects (name and manager flag),
    created_at and how many working (not revoked, not expired) tokens they have."""
    now = utcnow()
    users = session.scalars(select(User).order_by(User.name)).all()
    memberships: dict[uuid.UUID, list[dict[str, Any]]] = {}
    rows = session.execute(
        select(ProjectMember.user_id, Project.name, ProjectMember.manager)
        .join(Project, Project.id == ProjectMember.project_id)
        .order_by(Project.name)
    )
    for user_id, project, manager in rows:
        memberships.setdefault(user_id, []).append({"name": project, "manager": bool(manager)})
    tokens = dict(
        session.execute(
            select(ApiToken.user_id, func.count())
            .where(ApiToken.revoked_at.is_(None), (ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > now))
            .group_by(ApiToken.user_id)
        ).all()
    )
    return [
        {
            "name": user.name,
            "role": Role(user.role).value,
            "disabled_at": _iso(user.disabled_at),
            "projects": memberships.get(user.id, []),
            "created_at": _iso(user.created_at),
            "tokens": int(tokens.get(user.id, 0)),
        }
        for user in users
    ]


# -- tokens ------------------------------------------------------------------------------------
def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(presented: object) -> tuple[uuid.UUID, str] | None:
    """``(token id, secret)`` of a well-formed token, else ``None``."""
    if not isinstance(presented, str) or len(presented) > 200:
        return None
    match = _TOKEN.fullmatch(presented.strip())
    if match is None:
        return None
    return uuid.UUID(hex=match.group(1)), match.group(2)


def create_token(
    session: Session,
    user_name: str,
    *,
    name: str | None = None,
    expires_days: int | None = None,
    now: datetime | None = None,
) -> tuple[ApiToken, str]:
    """A new token of the user: the row, and the token itself (shown once, never stored)."""
    user = get_user(session, user_name)
    if user.disabled_at is not None:
        raise UserError(f"user {user_name!r} is disabled")
    name = "token" if name is None else name.strip()
    if not name or len(name) > NAME_MAX or not name.isprintable():
        raise UserError(f"token name: use 1-{NAME_MAX} printable characters")
    now = now or utcnow()
    expires_at = None
    if expires_days is not None:
        if not 1 <= expires_days <= MAX_EXPIRES_DAYS:
            raise UserError(f"expires_days: give 1 to {MAX_EXPIRES_DAYS} days")
        expires_at = now + timedelta(days=expires_days)
    secret = secrets.token_urlsafe(32)
    token = ApiToken(
        id=uuid.uuid4(),
        user_id=user.id,
        name=name,
        secret_hash=hash_secret(secret),
        expires_at=expires_at,
        created_at=now,
        updated_at=now,
    )
    session.add(token)
    session.flush()
    return token, f"{TOKEN_PREFIX}{token.id.hex}_{secret}"


def token_state(token: Any, now: datetime | None = None) -> str:
    """``revoked``, ``expired`` or ``active``."""
    now = now or utcnow()
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"


def list_tokens(session: Session, user_name: str | None = None) -> list[dict[str, Any]]:
    """Tokens as plain data (never their hash), oldest first; of one user when named."""
    now = utcnow()
    query = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id)
    if user_name is not None:
        query = query.where(ApiToken.user_id == get_user(session, user_name).id)
    rows = session.execute(query.order_by(ApiToken.created_at, ApiToken.id)).all()
    return [
        {
            "id": str(token.id),
            "user": user,
            "name": token.name,
            "created_at": _iso(token.created_at),
            "expires_at": _iso(token.expires_at),
            "revoked_at": _iso(token.revoked_at),
            "last_used_at": _iso(token.last_used_at),
            "state": token_state(token, now),
        }
        for token, user in rows
    ]


def find_token(session: Session, ref: str | uuid.UUID) -> ApiToken:
    """The token ``ref`` names: its whole id, or a unique prefix of at least 6 hex digits."""
    if isinstance(ref, uuid.UUID):
        token = session.get(ApiToken, ref)
        if token is None:
            raise NotFound(f"no token {ref}")
        return token
    text = str(ref).strip().lower().removeprefix(TOKEN_PREFIX)
    digits = text.split("_", 1)[0].replace("-", "")  # a whole token names its id too
    if not MIN_TOKEN_REF <= len(digits) <= 32 or _HEX.fullmatch(digits) is None:
        raise UserError(f"token {str(ref)[:12]!r}: give its id or at least its first {MIN_TOKEN_REF} hex digits")
    hex_id = func.lower(func.replace(cast(ApiToken.id, String), "-", ""))
    matches = session.scalars(select(ApiToken).where(hex_id.like(f"{digits}%")).limit(2)).all()
    if not matches:
        raise NotFound(f"no token id starts with {digits!r}")
    if len(matches) > 1:
        raise UserError(f"token id prefix {digits!r} is ambiguous; give more of the id")
    return matches[0]


def revoke_token(session: Session, ref: str | uuid.UUID, now: datetime | None = None) -> ApiToken:
    """Revoke a token (by id or unique id prefix); it stops working at once. Revoking a revoked
    token changes nothing."""
    token = find_token(session, ref)
    if token.revoked_at is None:
        token.revoked_at = now or utcnow()
        session.flush()
    return token


# -- principals --------------------------------------------------------------------------------
def authenticate(session: Session, presented: str, now: datetime | None = None) -> Principal | None:
    """The principal a presented token stands for, or ``None`` (malformed, unknown, wrong secret,
    revoked, expired, or its user disabled). The secret's hash is compared in constant time, also
    when the token id is unknown. Sets ``last_used_at`` when it is older than a minute."""
    parsed = parse_token(presented)
    if parsed is None:
        return None
    token_id, secret = parsed
    row = session.execute(
        select(
            ApiToken.secret_hash,
            ApiToken.expires_at,
            ApiToken.revoked_at,
            ApiToken.last_used_at,
            User.id,
            User.name,
            User.role,
            User.disabled_at,
        )
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.id == token_id)
    ).one_or_none()
    matches = hmac.compare_digest(hash_secret(secret), row.secret_hash if row is not None else _DUMMY_HASH)
    if row is None or not matches:
        return None
    now = now or utcnow()
    if row.revoked_at is not None or row.disabled_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        session.execute(
            update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now),
            execution_options={"synchronize_session": False},
        )
    return _principal(session, row.id, row.name, Role(row.role), token_id)


def principal_for(session: Session, user_name: str) -> Principal:
    """The principal of a user by name (direct mode and tests); a disabled user is refused."""
    user = get_user(session, user_name)
    if user.disabled_at is not None:
        raise Unauthorized(f"user {user_name!r} is disabled")
    return _principal(session, user.id, user.name, Role(user.role), None)


def principal_of(session: Session, user_id: uuid.UUID) -> Principal:
    """The principal of a user by id (what a submit recorded as the job's owner acts as)."""
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    return _principal(session, user.id, user.name, Role(user.role), None)


def _principal(session: Session, user_id: uuid.UUID, name: str, role: Role, token_id: uuid.UUID | None) -> Principal:
    if role == Role.ADMIN:  # an admin may act in every project
        rows = [(pid, pname, True) for pid, pname in session.execute(select(Project.id, Project.name))]
    else:
        rows = session.execute(
            select(Project.id, Project.name, ProjectMember.manager)
            .join(ProjectMember, ProjectMember.project_id == Project.id)
            .where(ProjectMember.user_id == user_id)
        ).all()
    return Principal(
        user_id=user_id,
        name=name,
        role=role,
        projects={pid: bool(manager) for pid, _, manager in rows},
        project_ids_by_name={pname: pid for pid, pname, _ in rows},
        token_id=token_id,
    )


# -- audit -------------------------------------------------------------------------------------
_SECRET_KEYS = re.compile(r"secret|password|plaintext", re.I)
_TOKEN_TEXT = re.compile(r"pf_[0-9a-f]{32}_[A-Za-z0-9_-]+")


def record_audit(
    session: Session,
    principal: Principal | None,
    action: str,
    *,
    target: str | None = None,
    remote: str | None = None,
    status: int = 200,
    detail: Mapping[str, Any] | None = None,
    actor: str | None = None,
) -> AuditEvent:
    """Add one audit row: who (``principal``, or ``actor`` for someone who is not a farm user,
    such as the OS user of a CLI command), what, on what, from where, and the outcome. Values
    that look like a token and keys that name a secret are masked in ``detail``."""
    event = AuditEvent(
        at=utcnow(),
        actor=_cut(principal.name if principal is not None else actor, 64),
        actor_id=principal.user_id if principal is not None else None,
        token_id=principal.token_id if principal is not None else None,
        action=_cut(action, 64) or "",
        target=_cut(target, 256),
        remote=_cut(remote, 64),
        status=int(status),
        detail=_masked(dict(detail or {})),
    )
    session.add(event)
    return event


def _masked(value: Any, key: str = "") -> Any:
    if _SECRET_KEYS.search(key):
        return "***"
    if isinstance(value, dict):
        return {str(k): _masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    if isinstance(value, str):
        return _TOKEN_TEXT.sub("pf_***", value)
    return value


def _cut(text: object, limit: int) -> str | None:
    return None if text is None else str(text)[:limit]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
