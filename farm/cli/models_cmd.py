"""``farm models``: tiny random-weight models for tests and the demo."""

from __future__ import annotations

from pathlib import Path

import typer

from farm.cli.common import console

app = typer.Typer(help="Build tiny random-weight diffusers models (no downloads).", no_args_is_help=True)


@app.command()
def tiny(
    family: str = typer.Argument(..., help="sd15 or sdxl"),
    folder: Path = typer.Argument(..., help="Where to write the pipeline folder."),
    seed: int = typer.Option(0, help="Weights seed (same seed, same weights)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
) -> None:
    """Write a tiny random-weight pipeline of FAMILY into FOLDER."""
    from farm.tiny_models import build_tiny_model

    if folder.exists() and any(folder.iterdir()) and not force:
        console.print(f"{folder} is not empty; use --force to write into it")
        raise typer.Exit(2)
    build_tiny_model(family, folder, seed=seed)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    console.print(f"tiny {family} model written to {folder} ({size / 1e6:.1f} MB)")
