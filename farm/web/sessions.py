"""Signing in to the dashboard: ``/login`` (a user name and password, or an API token pasted in),
``/logout``, the session cookie (HttpOnly, SameSite=Strict, Secure when ``api.public_url`` is
https) and the CSRF token every form carries.

The login form has no session yet, so its CSRF token is a double-submit one: a random value in a
short-lived cookie and in the form, which must match. Every later form carries the session's own
token (:func:`form_caller` checks it; 403 without it). Logins, failed ones included, and logouts
are audited.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.responses import RedirectResponse

from farm.api.auth import SESSION_COOKIE, audit, browser_session
from farm.api.state import ApiState, api_state
from farm.errors import Forbidden
from farm.web.render import LoginNeeded, PageRoute, page
from storage.db import session_scope
from storage.identity import Principal, authenticate
from storage.logins import SESSION_LIFETIME, check_password, csrf_matches, end_session, start_session

LOGIN_CSRF_COOKIE = "farm_login_csrf"
CSRF_FIELD = "csrf"
router = APIRouter(route_class=PageRoute, include_in_schema=False)
State = Annotated[ApiState, Depends(api_state)]


def page_caller(request: Request, state: State) -> Principal:
    """The signed-in visitor of a page; a visitor who is not is sent to the login page."""
    signed_in = browser_session(state, request)
    if signed_in is None:
        raise LoginNeeded("sign in to see this page")
    return signed_in[0]


def form_caller(request: Request, state: State, csrf: Annotated[str, Form(max_length=128)] = "") -> Principal:
    """The signed-in visitor of a form's POST, whose form carried the session's CSRF token (403
    and an audit row without it)."""
    who = page_caller(request, state)
    if not csrf_matches(request.state.browser_session[1], csrf):
        audit(state, request, who, "web.csrf", target=request.url.path[:200], status=403)
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")
    return who


def _secure(state: ApiState) -> bool:
    return (state.settings.api.public_url or "").lower().startswith("https://")


def _next(target: str | None) -> str:
    """Where to go after login: a path on this site only (never another host)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/jobs"
    return target[:500]


def _login_page(request: Request, state: ApiState, target: str | None, *, failed: bool) -> Response:
    """The login form with a fresh double-submit CSRF token (in the form and a cookie)."""
    token = secrets.token_urlsafe(32)
    status = 401 if failed else 200
    response = page(request, "login.html", status=status, next=_next(target), login_csrf=token, failed=failed)
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, max_age=3600, httponly=True, samesite="strict", secure=_secure(state), path="/login"
    )
    return response


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/jobs", status_code=303)


@router.get("/login")
def login_form(request: Request, state: State, next: Annotated[str | None, Query(max_length=500)] = None) -> Response:
    return _login_page(request, state, next, failed=False)


@router.post("/login")
def login(
    request: Request,
    state: State,
    name: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    token: Annotated[str, Form(max_length=256)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=500)] = "/jobs",
) -> Response:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not csrf_matches(expected, csrf):
        raise Forbidden("the login form's CSRF token is missing or wrong: reload the login page and try again")
    with session_scope(state.sessions) as session:
        if token.strip():
            who = authenticate(session, token.strip())
        else:
            who = check_password(session, name.strip(), password) if name.strip() and password else None
        cookie = start_session(session, who)[0] if who is not None else None
    how = "token" if token.strip() else "password"
    if who is None or cookie is None:
        audit(state, request, None, "web.login", target=name.strip()[:64] or None, status=401, detail={"via": how})
        return _login_page(request, state, next, failed=True)
    audit(state, request, who, "web.login", target=who.name, detail={"via": how})
    response = RedirectResponse(_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=_secure(state),
        path="/",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, state: State, who: Annotated[Principal, Depends(form_caller)]) -> Response:
    with session_scope(state.sessions) as session:
        end_session(session, request.cookies.get(SESSION_COOKIE))
    audit(state, request, who, "web.logout", target=who.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(state))
    return response
