"""``farm models``: the model registry (:mod:`farm.cli.registry_cmd`) and tiny random-weight models."""

from __future__ import annotations

from pathlib import Path

import typer

from farm.cli.common import console
from farm.cli.registry_cmd import add_commands
from farm.tiny_components import build_tiny_controlnet, build_tiny_face_pack, build_tiny_ip_adapter
from farm.tiny_models import build_tiny_model, check_family

app = typer.Typer(
    help="The model registry (push, list, show, rm, prefetch) and tiny random-weight models for tests.",
    no_args_is_help=True,
)


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
    instantid: bool = typer.Option(False, "--instantid", help="InstantID-shaped: Resampler over 512-d faces."),
    seed: int = typer.Option(0, "--seed", help="Weights seed."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder."),
) -> None:
    """Fabricate an IP-Adapter and CLIP vision encoder for the tiny FAMILY model (tests, demos);
    with --instantid, an InstantID checkpoint (16 tokens from a 512-d face embedding, no encoder)."""

    if folder.is_dir() and any(folder.iterdir()) and not force:
        console.print(f"{folder} is not empty; use --force to write into it")
        raise typer.Exit(2)
    if instantid:
        build_tiny_ip_adapter(family, folder, plus=True, tokens=16, embedding_dim=512, image_encoder=False, seed=seed)
    else:
        build_tiny_ip_adapter(family, folder, plus=plus, seed=seed)
    kind = "InstantID" if instantid else "plus" if plus else "plain"
    console.print(f"tiny {kind} {family} IP-Adapter written to {folder.resolve()} ({_size(folder) / 1e6:.1f} MB)")


@app.command("tiny-face-pack")
def tiny_face_pack(
    folder: Path = typer.Argument(..., help="Pack folder (point worker.face_models_dir at it)."),
) -> None:
    """Write a tiny insightface pack (SCRFD-shaped detector, ArcFace-shaped recognizer) for tests
    and demos; real work uses the antelopev2 pack."""

    build_tiny_face_pack(folder)
    console.print(f"tiny face pack written to {folder.resolve()} ({_size(folder) / 1e6:.1f} MB)")


@app.command("tiny-controlnet")
def tiny_controlnet(
    family: str = typer.Argument(..., help="sd15 or sdxl (the tiny model it fits)."),
    folder: Path = typer.Argument(..., help="Where to write the ControlNet folder."),
) -> None:
    """Write a tiny ControlNet (an IdentityNet stand-in for sdxl) for the tiny FAMILY model."""

    build_tiny_controlnet(family, folder)
    console.print(f"tiny {family} ControlNet written to {folder.resolve()} ({_size(folder) / 1e6:.1f} MB)")


add_commands(app)
