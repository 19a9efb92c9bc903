"""``farm bulk submit|status|retry|export|package`` and ``farm beat`` (nightly bulk renders)."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.table import Table

from farm.beat import beat_schedule
from farm.celery_app import create_app
from farm.cli.common import console, settings
from farm.client import FarmClient
from farm.datasets.package import package_bulk
from farm.reconciler import Reconciler, ReconcilerLoop

app = typer.Typer(help="Bulk dataset renders: manifests fed to the queues in windows.", no_args_is_help=True)


def _client():

    return FarmClient(settings())


@app.command()
def submit(
    manifest: str = typer.Argument(..., help="JSONL or CSV manifest: a local file, or store:<key> in the bucket."),
    base: Path = typer.Option(..., "--base", help="Base job spec (YAML/JSON) the rows apply to."),
    name: str = typer.Option(..., "--name", help="Bulk job name: its idempotency key."),
    until: str | None = typer.Option(None, "--until", help="Stop feeding at this ISO time (UTC when no zone)."),
) -> None:
    """Create a bulk job, or add the rows it does not have yet; prints what was added."""
    feed_until = None
    if until:
        feed_until = datetime.fromisoformat(until)
        feed_until = feed_until if feed_until.tzinfo else feed_until.replace(tzinfo=UTC)
    with _client() as client:
        result = client.submit_bulk(name, base, manifest, feed_until=feed_until)
    console.print(
        f"bulk job {result['name']}: {result['new_rows']} new row(s), {result['known_rows']} already there; "
        f"{result['jobs']} job(s), {result['shards']} shard(s) added; {result['fed']} sent now",
        highlight=False,
    )


@app.command()
def status(name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Rows done, failed and remaining, per model family."""
    with _client() as client:
        result = client.bulk_status(name)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"bulk job {name}")
    for column in ("family", "rows", "done", "failed", "remaining"):
        table.add_column(column)
    for family, row in sorted(result["families"].items()):
        table.add_row(family, *(str(row[k]) for k in ("rows", "done", "failed", "remaining")))
    table.add_row("all", *(str(result[k]) for k in ("rows", "done", "failed", "remaining")))
    console.print(table)
    if result["feed_until"]:
        console.print(f"feeding until {result['feed_until']}")


@app.command()
def retry(name: str = typer.Argument(...)) -> None:
    """Feed a bulk job's failed rows again (in windows)."""
    with _client() as client:
        console.print(f"re-fed {client.retry_bulk(name)} failed shard(s) of bulk job {name}")


@app.command()
def export(
    name: str = typer.Argument(...), out: Path = typer.Option(..., "--out", help="JSONL file to write.")
) -> None:
    """The dataset: one JSON line per rendered row (row id, params, seed, model hash, key, sha256)."""
    with _client() as client:
        console.print(f"wrote {client.export_bulk(name, out)} row(s) to {out}")


@app.command()
def package(
    name: str = typer.Argument(...),
    format: str = typer.Option(..., "--format", help="webdataset, parquet or files."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Samples per shard."),
    out: str | None = typer.Option(
        None, "--out", help="A local folder, or store:<prefix> in the bucket (default store:packages/NAME/FORMAT)."
    ),
) -> None:
    """Package the rendered rows as a dataset: shards, a stats JSON per shard, manifest.json and a
    dataset card. Again later, it adds shards for the rows rendered since (on the control host)."""
    with FarmClient(settings(), direct=True) as client:

        def shown(entry: dict) -> None:
            failed = f", {len(entry['failed'])} failed row(s) in its stats" if entry["failed"] else ""
            line = f"  {entry['name']}: {entry['samples']} sample(s), {entry['bytes']} bytes{failed}"
            console.print(line, highlight=False)

        result = package_bulk(client.sessions, client.store, name, format, shard_size, out, on_shard=shown)
    console.print(
        f"{result['format']} package of bulk job {name} in {result['out']}: {result['new_shards']} new shard(s), "
        f"{result['new_rows']} new row(s); {result['packaged']} row(s) in {result['shards']} shard(s), "
        f"{result['failed']} failed (listed in manifest.json), {result['pending']} not rendered yet",
        highlight=False,
    )
    if result["removed_unlisted"]:
        removed = result["removed_unlisted"]
        console.print(f"removed {removed} unlisted shard file(s) an interrupted run left", highlight=False)


def beat(loglevel: str = typer.Option("INFO", help="Log level.")) -> None:
    """Run Celery beat: bulk window top-ups and the nightly bulk renders of bulk.schedules."""

    cfg = settings()
    celery = create_app(cfg)
    celery.conf.beat_schedule = beat_schedule(cfg)
    for entry in cfg.bulk.schedules:
        until = entry.window_end or "-"
        console.print(f"nightly bulk {entry.name}: {entry.at} {entry.timezone}, feeding until {until}")
    with contextlib.ExitStack() as running:
        if cfg.reconcile.enabled:
            running.enter_context(ReconcilerLoop(Reconciler.for_settings(cfg, celery)))
            console.print(f"reconciler: a pass every {cfg.reconcile.interval_s:g}s")
        celery.start(["beat", "--loglevel", loglevel, "--scheduler", "celery.beat:Scheduler"])


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="bulk")
    root.command()(beat)
