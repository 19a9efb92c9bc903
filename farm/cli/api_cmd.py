"""``farm api``: serve the farm API (the front door for people and their scripts)."""

from __future__ import annotations

import typer

from farm.cli.common import console, settings
from storage import migrate

SHUTDOWN_GRACE_S = 5  # seconds requests in flight get when the server is told to stop


def api(
    address: str | None = typer.Option(None, help="Address to listen on (default: api.address)."),
    port: int | None = typer.Option(None, help="Port to listen on (default: api.port)."),
    loglevel: str = typer.Option("info", help="uvicorn's log level."),
) -> None:
    """Serve the farm API: submit, watch, cancel and fetch jobs with a token (`farm tokens
    create`), no database, broker or bucket keys needed by the people using it. Put TLS in front
    of it (see the README) and never publish the database or the broker."""

    import uvicorn

    from farm.api.app import create_api

    config = settings()
    if config.embedded:  # the embedded farm sets itself up; elsewhere `farm db upgrade` is a deliberate step
        migrate.upgrade(config.database_url)
    host = address or config.api.address
    listen = port or config.api.port
    console.print(f"farm API on http://{host}:{listen} (OpenAPI: /openapi.json)", highlight=False)
    uvicorn.run(
        create_api(config),
        host=host,
        port=listen,
        log_level=loglevel.lower(),
        proxy_headers=True,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,  # open event streams do not hold a stop up
    )


def register(app: typer.Typer) -> None:
    app.command()(api)
