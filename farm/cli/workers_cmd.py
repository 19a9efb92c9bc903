"""``farm workers``: the worker registry as a table."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from farm.cli.common import console, settings
from farm.cli.jobs_cmd import duration
from farm.client import FarmClient


def _memory(n: int | None) -> str:
    return f"{n / 2**30:.0f} GiB" if n else ""


def workers(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List registered workers: status, queues, device, pinned models, current shard, heartbeat."""

    with FarmClient(settings()) as client:
        rows = client.workers()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="workers")
    for column in ("name", "status", "host", "queues", "device", "pinned models", "current shard", "heartbeat"):
        table.add_column(column, overflow="fold")
    styles = {"online": "green", "lost": "bold red", "draining": "yellow", "stopped": "dim"}
    for w in rows:
        device = w["device"] if not w["gpu_name"] else f"{w['gpu_name']} ({_memory(w['gpu_memory_bytes'])})"
        shard = w["current_shard"]
        current = f"{shard['job_id'][:8]} #{shard['index']} {shard['progress']:.0%}" if shard else ""
        table.add_row(
            w["name"],
            f"[{styles.get(w['status'], '')}]{w['status']}[/]",
            w["hostname"],
            ", ".join(w["queues"]),
            device,
            ", ".join(w["pinned_models"]),
            current,
            f"{duration(w['silent_s'])} ago",
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command()(workers)
