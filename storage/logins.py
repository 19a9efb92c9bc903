"""Logging in to the web dashboard: a user's password (an Argon2 hash in ``user.password_hash``)
and browser sessions (``web_session``).

A session cookie holds a random id; the table keeps only its SHA-256, so a copy of the database
gives no one a working session. Each session has its own CSRF token, which every form of that
browser carries and every POST is checked against. Disabling a user ends their sessions at once
(checked on each request), as it does for their tokens.

Like every storage function these take a session and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.errors import Unauthorized, UserError
from storage.identity import Principal, get_user, principal_for
from storage.models import User, WebSession, utcnow

PASSWORD_MIN = 8
PASSWORD_MAX = 1024
SESSION_LIFETIME = timedelta(hours=12)
MAX_COOKIE_CHARS = 128

_hasher = PasswordHasher()
_DUMMY = "$argon2id$v=19$m=65536,t=3,p=4$eQe7K8lGFpZp6vtpaYWl2A$wGnpvKo/Ph25oMkcJQu8aPqqeaI7jPYZqTbdYBuQAWA"


def check_password_text(password: str) -> str:
    """``password`` when it is acceptable: 8 to 1024 characters, not only spaces."""
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX or not password.strip():
        raise UserError(f"a password needs {PASSWORD_MIN} to {PASSWORD_MAX} characters")
    return password


def set_password(session: Session, user_name: str, password: str) -> User:
    """Give the user a new password (stored as an Argon2 hash); their web sessions end."""
    user = get_user(session, user_name)
    user.password_hash = _hasher.hash(check_password_text(password))
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    return user


def check_password(session: Session, user_name: str, password: str) -> Principal | None:
    """The principal when the name and password match an enabled user with a password, else
    ``None`` (the same work is done for an unknown name: nothing tells which part was wrong)."""
    if not isinstance(user_name, str) or not isinstance(password, str) or len(password) > PASSWORD_MAX:
        return None
    user = session.scalar(select(User).where(User.name == user_name[:64]))
    stored = user.password_hash if user is not None and user.password_hash else _DUMMY
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.password_hash or user.disabled_at is not None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return principal_for(session, user.name)


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start_session(session: Session, principal: Principal, now: datetime | None = None) -> tuple[str, str]:
    """A new web session for the principal: ``(cookie value, CSRF token)``; expired sessions
    are swept on the way."""
    now = now or utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(
        WebSession(
            id_hash=_digest(session_id),
            user_id=principal.user_id,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + SESSION_LIFETIME,
        )
    )
    session.flush()
    return session_id, csrf


def session_principal(
    session: Session, cookie: str | None, now: datetime | None = None
) -> tuple[Principal, str] | None:
    """``(principal, CSRF token)`` of a session cookie, or ``None`` (unknown, expired, or its user
    disabled)."""
    if not cookie or len(cookie) > MAX_COOKIE_CHARS:
        return None
    row = session.execute(
        select(WebSession.csrf_token, WebSession.expires_at, User.name)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.id_hash == _digest(cookie))
    ).one_or_none()
    if row is None or row.expires_at <= (now or utcnow()):
        return None
    try:
        return principal_for(session, row.name), row.csrf_token
    except Unauthorized:  # disabled
        return None


def csrf_matches(expected: str, presented: object) -> bool:
    if not isinstance(presented, str) or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented[:128].encode())


def end_session(session: Session, cookie: str | None) -> None:
    """Log the session out (nothing happens for an unknown one)."""
    if cookie and len(cookie) <= MAX_COOKIE_CHARS:
        session.execute(delete(WebSession).where(WebSession.id_hash == _digest(cookie)))
