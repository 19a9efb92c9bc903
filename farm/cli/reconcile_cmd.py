"""``farm reconcile``: run reconciler passes by hand (one, or a loop like a control worker's)."""

from __future__ import annotations

import json
import time

import typer

from farm.celery_app import create_app
from farm.cli.common import console, settings
from farm.reconciler import Reconciler


def reconcile(
    loop: bool = typer.Option(False, "--loop", help="Keep running a pass every reconcile.interval_s."),
    as_json: bool = typer.Option(False, "--json", help="Print each pass's counts as one JSON line."),
) -> None:
    """Restore progress from the database after lost messages, dead workers or a refusing store.

    A pass schedules jobs whose message was lost, re-sends lost or orphaned shards, fails crash
    loops, finalizes ended jobs, writes missing manifests and tops up bulk windows."""

    cfg = settings()
    app = create_app(cfg)
    reconciler = Reconciler.for_settings(cfg, app)
    try:
        while True:
            report = reconciler.run_pass()
            if as_json:
                typer.echo(json.dumps(report.as_dict(), sort_keys=True))
            else:
                console.print(f"reconciler: {report.describe()} ({report.seconds:.2f}s)", highlight=False)
            if not loop:
                if report.errors:
                    raise typer.Exit(1)
                return
            time.sleep(cfg.reconcile.interval_s)
    finally:
        app.close()


def register(app: typer.Typer) -> None:
    app.command()(reconcile)
