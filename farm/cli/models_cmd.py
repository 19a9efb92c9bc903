"""``farm models``: tiny random-weight models for tests and the demo."""

from __future__ import annotations

from pathlib import Path

import typer

from farm.cli.common import console

app = typer.Typer(help="Build tiny random-weight diffusers models (no downloads).", no_args_is_help=True)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@app.command()
def tiny(
    family: str = typer.Argument(..., help="sd15, sdxl or svd."),
    folder: Path = typer.Argument(..., help="Where to write the pipeline folder."),
    seed: int = typer.Option(0, "--seed", help="Weights seed (same seed, bit-identical weights)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
) -> None:
    """Write a tiny random-weight pipeline of FAMILY into FOLDER (loads with from_pretrained)."""
    from farm.tiny_models import build_tiny_model, check_family

    check_family(family)
    if folder.exists() and not folder.is_dir():
        console.print(f"{folder} exists and is not a folder")
        raise typer.Exit(2)
    if folder.is_dir() and any(folder.iterdir()) and not force:
        console.print(f"{folder} is not empty; use --force to write into it")
        raise typer.Exit(2)
    build_tiny_model(family, folder, seed=seed)
    size = _size(folder)
    console.print(f"tiny {family} model (seed {seed}) written to {folder.resolve()} ({size / 1e6:.1f} MB)")


@app.command("tiny-ip-adapter")
def tiny_ip_adapter(
    family: str = typer.Argument(..., help="sd15 or sdxl (the tiny model it fits)."),
    folder: Path = typer.Argument(..., help="Where to write image_encoder/ and ip-adapter.{safetensors,bin}."),
    plus: bool = typer.Option(False, "--plus", help="A Resampler ('plus') adapter instead of a plain one."),
    seed: int = typer.Option(0, "--seed", help="Weights seed."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
) -> None:
    """Fabricate an IP-Adapter and CLIP vision encoder for the tiny FAMILY model (tests, demos)."""
    from farm.tiny_models import build_tiny_ip_adapter

    if folder.is_dir() and any(folder.iterdir()) and not force:
        console.print(f"{folder} is not empty; use --force to write into it")
        raise typer.Exit(2)
    build_tiny_ip_adapter(family, folder, plus=plus, seed=seed)
    kind = "plus" if plus else "plain"
    console.print(f"tiny {kind} {family} IP-Adapter written to {folder.resolve()} ({_size(folder) / 1e6:.1f} MB)")
