"""Who is calling: the bearer token of every ``/v1`` request, checked against the database on
each request (a revoked token stops working at once), and the audit record of what they changed.

A browser signed in to the web dashboard (:mod:`farm.web.sessions`) is known by its session
cookie instead: enough for reading; a state-changing call made with only the cookie must also
carry the session's CSRF token in ``X-CSRF-Token`` (403 without it), so no other site can make a
signed-in browser change anything. A bearer token always wins over a cookie."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from farm.api.state import ApiState, api_state
from farm.errors import Forbidden, Unauthorized
from storage.db import session_scope
from storage.identity import Principal, authenticate, record_audit
from storage.logins import csrf_matches, session_principal

MAX_TOKEN_CHARS = 256
SESSION_COOKIE = "farm_session"
CSRF_HEADER = "X-CSRF-Token"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
bearer = HTTPBearer(auto_error=False, description="An API token from `farm tokens create`.")


def browser_session(state: ApiState, request: Request) -> tuple[Principal, str] | None:
    """``(principal, CSRF token)`` of the request's session cookie, or ``None`` (looked up once
    per request)."""
    if not hasattr(request.state, "browser_session"):
        found = None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            with session_scope(state.sessions) as session:
                found = session_principal(session, cookie)
        request.state.browser_session = found
    return request.state.browser_session


def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    state: Annotated[ApiState, Depends(api_state)],
) -> Principal:
    """The principal the request's token names; 401 without a token or with a bad, expired or
    revoked one (the same answer for each: nothing tells which). Without a token, a signed-in
    browser's session cookie (and, to change anything, its CSRF token)."""
    if credentials is None or not credentials.credentials:
        signed_in = browser_session(state, request)
        if signed_in is not None:
            principal, csrf = signed_in
            if request.method not in READ_METHODS and not csrf_matches(csrf, request.headers.get(CSRF_HEADER)):
                raise Forbidden(f"a change made with a browser session needs its CSRF token ({CSRF_HEADER})")
            request.state.principal = principal
            return principal
        raise Unauthorized("an API token is required (Authorization: Bearer <token>)")
    token = credentials.credentials.strip()
    principal = None
    if len(token) <= MAX_TOKEN_CHARS:
        with session_scope(state.sessions) as session:
            principal = authenticate(session, token)
    if principal is None:
        raise Unauthorized("the API token is not valid (unknown, expired or revoked)")
    request.state.principal = principal
    return principal


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def audit(
    state: ApiState,
    request: Request,
    principal: Principal | None,
    action: str,
    *,
    target: str | None = None,
    status: int = 200,
    detail: dict[str, Any] | None = None,
) -> None:
    """Write one audit row for a state-changing call (its own transaction: a refused call is
    recorded too)."""
    with session_scope(state.sessions) as session:
        record_audit(
            session, principal, action, target=target, remote=client_address(request), status=status, detail=detail
        )
