"""``farm db``: create and upgrade the state database with Alembic."""

from __future__ import annotations

import typer

from farm.cli.common import console, settings
from farm.settings import redact_url
from storage import migrate

app = typer.Typer(help="Create, upgrade and inspect the state database (Alembic migrations).", no_args_is_help=True)


@app.command()
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: the newest). Safe to run repeatedly."""

    cfg = settings()
    migrate.upgrade(cfg.database_url, revision)
    console.print(f"database {redact_url(cfg.database_url)} at revision {migrate.current(cfg.database_url)}")


@app.command()
def downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base.")) -> None:
    """Revert migrations down to REVISION (`base` drops every farm table)."""

    cfg = settings()
    migrate.downgrade(cfg.database_url, revision)
    console.print(f"database {redact_url(cfg.database_url)} at revision {migrate.current(cfg.database_url)}")


@app.command()
def current() -> None:
    """Print the database's revision (`none` when it was never migrated)."""

    cfg = settings()
    console.print(migrate.current(cfg.database_url) or "none")


@app.command()
def heads() -> None:
    """Print the newest revision(s) this code ships."""

    for head in migrate.heads():
        console.print(head)
