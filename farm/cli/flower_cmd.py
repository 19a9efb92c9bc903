"""``farm flower``: Celery's monitoring UI (Flower) for the farm's Celery app.

Flower runs in this process on the app :func:`~farm.celery_app.create_app` builds from the
settings, so it sees the same broker, queues and serializers as the workers. The basic-auth
credentials reach Flower through the ``FLOWER_BASIC_AUTH`` environment variable of this process,
never through a command line (which ``ps`` shows to every user) and never through a log line.
"""

from __future__ import annotations

import ipaddress
import os
import signal

import typer

from farm.celery_app import create_app
from farm.cli.common import err_console, settings
from farm.errors import ConfigError

USER_VAR, PASSWORD_VAR = "FARM_FLOWER__USER", "FARM_FLOWER__PASSWORD"
# The tasks page's columns unless FLOWER_TASKS_COLUMNS says otherwise: Flower 2.2 leaves out args
# and result, which say which job and shard a task renders and what it did (farm.shard_delivery).
TASKS_COLUMNS = "name,args,state,received,runtime,worker,result"


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _basic_auth(user: str | None, password: str | None, *, embedded: bool, address: str) -> str | None:
    """The ``user:password`` value for Flower, or None for an unauthenticated local Flower."""
    if user and password:
        # Flower splits FLOWER_BASIC_AUTH on commas (several accounts), and a browser sends
        # `user:password`, so a user with ':' or either part with ',' could never log in.
        if ":" in user or "," in user:
            raise ConfigError(f"{USER_VAR} must not contain ':' or ','")
        if "," in password:
            raise ConfigError(f"{PASSWORD_VAR} must not contain ',' (Flower splits its accounts on commas)")
        return f"{user}:{password}"
    missing = " and ".join(name for name, value in ((USER_VAR, user), (PASSWORD_VAR, password)) if not value)
    if user or password:
        raise ConfigError(f"Flower basic auth needs both {USER_VAR} and {PASSWORD_VAR}; {missing} is not set")
    if not embedded:
        raise ConfigError(
            f"Flower refuses to start without basic auth outside the embedded mode: set {USER_VAR} and {PASSWORD_VAR}"
        )
    if not _is_loopback(address):
        raise ConfigError(
            f"an unauthenticated Flower only listens on 127.0.0.1 (asked for {address}); "
            f"set {USER_VAR} and {PASSWORD_VAR} to listen elsewhere"
        )
    return None


def flower(
    address: str | None = typer.Option(None, help="Address to listen on. Default: FARM_FLOWER__ADDRESS (127.0.0.1)."),
    port: int | None = typer.Option(None, min=1, max=65535, help="HTTP port. Default: FARM_FLOWER__PORT (5555)."),
) -> None:
    """Start Flower, Celery's web UI, for the farm's Celery app (tasks, workers, /metrics).

    Basic auth comes from FARM_FLOWER__USER and FARM_FLOWER__PASSWORD and is required outside
    the embedded mode. Live monitoring of a real farm needs a Redis or RabbitMQ broker.
    """

    cfg = settings()
    address = address or cfg.flower.address
    port = port or cfg.flower.port
    password = cfg.flower.password.get_secret_value() if cfg.flower.password else None
    credentials = _basic_auth(cfg.flower.user, password, embedded=cfg.embedded, address=address)
    if credentials is None:
        # What we print must be true: an inherited FLOWER_BASIC_AUTH does not silently apply.
        os.environ.pop("FLOWER_BASIC_AUTH", None)
        err_console.print(
            f"[bold yellow]warning:[/] Flower starts WITHOUT authentication on {address}:{port} (embedded mode); "
            f"set {USER_VAR} and {PASSWORD_VAR} to protect it",
            highlight=False,
        )
    else:
        os.environ["FLOWER_BASIC_AUTH"] = credentials
    filesystem = cfg.broker.url.startswith("filesystem://")
    if filesystem:
        err_console.print(
            "[bold]note:[/] the filesystem broker is for one machine: Flower sees its task events, but its "
            "worker list is best effort; Flower needs Redis or RabbitMQ (FARM_BROKER__URL) to show live "
            "tasks of a real farm",
            highlight=False,
        )
    os.environ.setdefault("FLOWER_TASKS_COLUMNS", TASKS_COLUMNS)
    app = create_app(cfg)
    before = _event_bindings(app) if filesystem else set()
    # Flower reads the rest of its options from FLOWER_* variables; only the address and the port
    # go on its (in-process) command line. `enable_events` stays on: Flower keeps asking the
    # workers to send task events, so a worker started without --task-events shows up too.
    try:
        code = app.start(["flower", f"--address={address}", f"--port={port}"])
    finally:
        # Flower turns the first SIGTERM into a clean exit; a second one now ends the process.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if filesystem:
            _unbind_event_queues(app, before)
    if code:
        raise typer.Exit(code)


def _event_bindings(app) -> set:
    """The event exchange's bindings, kept by the filesystem transport in its control folder."""
    with app.connection_for_write() as conn:
        return set(conn.default_channel.get_table(app.conf.event_exchange))


def _unbind_event_queues(app, before: set) -> None:
    """Remove the event queues Flower bound while it ran (filesystem broker only).

    The filesystem transport keeps bindings in files and Flower never deletes its event queue, so
    without this every worker would go on writing its events (a heartbeat every 2 s, every task
    event) into message files that nobody reads. Bindings older than this Flower are left alone.
    """
    prefix = f"{app.conf.event_queue_prefix}."
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for binding in channel.get_table(app.conf.event_exchange):
                if binding not in before and binding.queue.startswith(prefix):
                    # kombu's own removal: drops the binding and purges the queue's message files.
                    channel._delete(binding.queue, app.conf.event_exchange, binding.routing_key, binding.pattern)
    except Exception as exc:  # never turn a clean stop into a traceback
        err_console.print(f"[bold yellow]warning:[/] could not remove Flower's event queue: {exc}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(flower)
