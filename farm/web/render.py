"""Rendering pages: the Jinja2 templates (autoescaped: whatever a job holds is shown as text),
a few formatting filters, and :class:`PageRoute`, the route class of every page, which answers a
farm error with an HTML page (404 for a job you may not see, 403, 409, ...) and a visitor who is
not signed in with a redirect to the login page."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape

from farm.api.errors import status_of
from farm.errors import FarmError

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


class LoginNeeded(FarmError):
    """The page needs a signed-in visitor (answered with a redirect to the login page)."""


def duration(seconds: float | None) -> str:
    """``42s``, ``3m 05s``, ``2h 07m``, ``3d 4h``; ``-`` for nothing."""
    if seconds is None:
        return "-"
    s = round(max(0.0, float(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def age(iso: str | datetime | None) -> str:
    if not iso:
        return "-"
    when = iso if isinstance(iso, datetime) else datetime.fromisoformat(iso)
    return duration((datetime.now(UTC) - when).total_seconds())


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def percent(done: int | float, total: int | float) -> int:
    return 0 if not total else max(0, min(100, round(100 * float(done) / float(total))))


@functools.cache
def environment() -> Environment:
    """The template environment (made on first use): autoescape on for every template."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=duration, age=age, size=size, urlpart=lambda v: quote(str(v), safe=""))
    env.globals.update(percent=percent)
    return env


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """The template rendered for the request (``who`` and ``csrf`` come from the signed-in
    session when there is one)."""
    signed_in = getattr(request.state, "browser_session", None)
    who, csrf = signed_in if signed_in else (None, "")
    html = environment().get_template(template).render(request=request, who=who, csrf=csrf, **context)
    headers = {
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Content-Security-Policy": "default-src 'self'; img-src * data:; media-src *; "
        "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    }
    return HTMLResponse(html, status_code=status, headers=headers)


def error_page(request: Request, exc: FarmError) -> Response:
    if isinstance(exc, LoginNeeded):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    status = status_of(exc)
    message = str(exc) if status < 500 or exc.retryable else "internal error"
    return page(request, "error.html", status=status, status_code=status, message=message)


class PageRoute(APIRoute):
    """A page's route: farm errors become HTML pages instead of the API's JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except FarmError as exc:
                return error_page(request, exc)

        return handle
