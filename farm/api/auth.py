"""Who is calling: the bearer token of every ``/v1`` request, checked against the database on
each request (a revoked token stops working at once), and the audit record of what they changed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from farm.api.state import ApiState, api_state
from farm.errors import Unauthorized
from storage.db import session_scope
from storage.identity import Principal, authenticate, record_audit

MAX_TOKEN_CHARS = 256
bearer = HTTPBearer(auto_error=False, description="An API token from `farm tokens create`.")


def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    state: Annotated[ApiState, Depends(api_state)],
) -> Principal:
    """The principal the request's token names; 401 without a token or with a bad, expired or
    revoked one (the same answer for each: nothing tells which)."""
    if credentials is None or not credentials.credentials:
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
