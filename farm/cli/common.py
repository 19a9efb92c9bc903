"""What every CLI command shares: loading settings and turning farm errors into clean exits."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from farm.errors import FarmError
from farm.settings import FarmSettings, load_settings

console = Console(soft_wrap=True)  # ids, URLs, paths and errors are never folded mid-word
err_console = Console(stderr=True, soft_wrap=True)


def settings() -> FarmSettings:
    """Settings from the environment; a configuration error ends the command with its reason."""
    return load_settings()


def run_app(app: typer.Typer) -> None:
    """Run the Typer app; a :class:`FarmError` prints one clear line and exits 2 (user error)
    or 1 (everything else) instead of a traceback."""
    try:
        app()
    except FarmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2 if isinstance(exc, ValueError) else 1)
