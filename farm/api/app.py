"""The FastAPI application: :func:`create_api` (used by ``farm api`` and by tests).

Requests larger than ``api.max_body_mb`` are refused before they are read (413); every request
is counted for ``/metrics`` by its route's template, never its concrete path (no ids, no keys);
CORS is off unless ``api.cors_origins`` lists origins. The app holds one direct connection to
the farm (database, broker, store), closed on shutdown. The web dashboard (:mod:`farm.web`) is
served beside the API: its pages at ``/``, ``/login``, ``/jobs``, ``/workers``, ``/bulk`` and its
stylesheet and scripts under ``/static``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from farm import __version__
from farm.api import bulk, errors, events, inputs, jobs, service, templates, webhooks
from farm.api.state import ApiState
from farm.client import FarmClient
from farm.settings import FarmSettings
from farm.web import farm_pages, jobs_pages, sessions
from farm.web.render import STATIC


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413: at once when its Content-Length says
    so, else as soon as that many bytes have arrived."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        refused = False  # this middleware answered 413: whatever the app sends next is dropped
        started = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}  # the app stops reading
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, tracked)

    async def _refuse(self, send: Send) -> None:
        mib = self.limit / (1 << 20)
        body = errors.error_body("BodyTooLarge", f"request body larger than {mib:g} MiB (api.max_body_mb)")
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def create_api(settings: FarmSettings, farm: FarmClient | None = None) -> FastAPI:
    """The farm API for ``settings`` (its database, broker and store are reached directly)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.farm_api.farm.close()

    app = FastAPI(
        title="Render farm API",
        version=__version__,
        description=(
            "Submit and watch render jobs. Every /v1 route needs `Authorization: Bearer <token>` "
            "(or the web dashboard's session cookie; a change made with it also needs `X-CSRF-Token`)."
        ),
        lifespan=lifespan,
    )
    app.state.farm_api = ApiState(
        settings=settings,
        farm=farm or FarmClient(settings, direct=True),
    )
    errors.install(app)
    for module in (jobs, webhooks, events, inputs, bulk, templates, service, sessions, jobs_pages, farm_pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def count_requests(request: Any, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        app.state.farm_api.counters.observe(
            request.method, template, response.status_code, time.perf_counter() - started
        )
        return response

    if settings.api.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "PUT"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(BodyLimit, limit=int(settings.api.max_body_mb * (1 << 20)))
    return app
