"""The ``farm`` command line.

Each command builds :class:`~farm.settings.FarmSettings` from the environment when it runs (never
at import time) and imports heavy modules only inside the command that needs them, so
``farm --help`` is instant and needs no torch.
"""

from __future__ import annotations

import typer

from farm import __version__
from farm.cli import (
    api_cmd,
    bulk_cmd,
    config_cmd,
    db_cmd,
    flower_cmd,
    jobs_cmd,
    models_cmd,
    reconcile_cmd,
    shares_cmd,
    storage_cmd,
    templates_cmd,
    users_cmd,
    worker_cmd,
    workers_cmd,
)
from farm.cli.common import run_app, setup_logging

app = typer.Typer(
    name="farm",
    help=(
        "Render farm for patched diffusion models.\n\n"
        "With no configuration everything runs embedded under ./farm-data (SQLite, a local "
        "object folder, a filesystem broker). Point it at Postgres, Redis or RabbitMQ and S3 "
        "with FARM_* environment variables: `farm config show` lists them all."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"farm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Let library messages through (model loading warnings, broker notices, progress bars); "
        "they are hidden by default. Goes before the command: farm --verbose submit job.yaml",
    ),
) -> None:
    """Render farm for patched diffusion models."""

    setup_logging(verbose)


app.add_typer(db_cmd.app, name="db")
app.add_typer(config_cmd.app, name="config")
app.add_typer(storage_cmd.app, name="storage")
app.add_typer(models_cmd.app, name="models")
jobs_cmd.register(app)
worker_cmd.register(app)
flower_cmd.register(app)
workers_cmd.register(app)
bulk_cmd.register(app)
reconcile_cmd.register(app)
api_cmd.register(app)
users_cmd.register(app)
shares_cmd.register(app)
templates_cmd.register(app)


def main() -> None:
    """Console-script entry point."""

    run_app(app)
