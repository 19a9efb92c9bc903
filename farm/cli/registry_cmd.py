"""``farm models push|list|show|rm|prefetch|import``: the model registry in the object store.

The commands are added to the ``farm models`` app (:mod:`farm.cli.models_cmd`). A model is named
on the command line as ``NAME``, ``NAME@VERSION``, ``NAME@sha256:DIGEST`` or with the spec's
``registry:`` prefix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from farm.cli.common import console, err_console, settings
from farm.file_digests import folder_files
from farm.model_refs import REGISTRY_PREFIX, RegistryError
from farm.model_registry import (
    ManifestRef,
    model_names,
    push_model,
    remove_version,
    resolve_model_ref,
    versions,
)
from farm.worker.model_store import host_model_store
from storage.objects import ObjectStore, open_store


def _store() -> ObjectStore:
    cfg = settings()
    return open_store(cfg.storage, cfg.data_dir)


def _ref(name: str) -> str:
    return name if name.startswith(REGISTRY_PREFIX) else REGISTRY_PREFIX + name


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def push(
    folder: Path = typer.Argument(
        ..., help="A diffusers pipeline folder (with model_index.json), or a LoRA's folder (give --family)."
    ),
    name: str = typer.Option(..., "--name", help="Registry name (A-Z a-z 0-9 . _ -)."),
    family: str | None = typer.Option(None, "--family", help="sd15, sdxl or svd (default: from model_index.json)."),
) -> None:
    """Hash every file of FOLDER, upload the blobs the store lacks and write a new version."""

    store = _store()
    total = sum(path.stat().st_size for _, path in folder_files(folder)) if folder.is_dir() else 0
    columns = (TextColumn("hashing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("hash", total=total)
        result = push_model(store, folder, name, family, progress=lambda n: bar.advance(task, n))
    ref = result.ref
    files = len(ref.manifest["files"])
    console.print(f"pushed {ref.name}@{ref.version} ({ref.family}, {files} files, {_mb(ref.size)})")
    console.print(
        f"blobs: {result.uploaded} uploaded ({_mb(result.uploaded_bytes)}), {result.present} already in the store"
    )
    console.print(f"use it as: model: {REGISTRY_PREFIX}{ref.name}  (pinned: {ref.pinned})")


def list_models() -> None:
    """Every registered model with its versions (the latest last)."""

    store = _store()
    names = model_names(store)
    if not names:
        console.print("no models in the registry (`farm models push FOLDER --name NAME` adds one)")
        return
    for name in names:
        latest = resolve_model_ref(store, REGISTRY_PREFIX + name)
        console.print(
            f"{name}: versions {', '.join(versions(store, name))}; latest {latest.version} ({latest.family}, "
            f"{_mb(latest.size)}, sha256:{latest.digest[:12]})"
        )


def _show(ref: ManifestRef) -> None:
    manifest = ref.manifest
    console.print(f"{ref.name}@{ref.version}  {manifest['family']} ({manifest['pipeline_class']})")
    console.print(f"manifest: sha256:{ref.digest}")
    console.print(f"created:  {manifest['created_at']} by {manifest['created_by']}")
    console.print(f"files:    {len(manifest['files'])} ({_mb(ref.size)})")
    for entry in manifest["files"]:
        console.print(f"  {entry['sha256'][:12]}  {entry['size']:>12}  {entry['path']}")


def show(name: str = typer.Argument(..., help="NAME (the latest), NAME@VERSION or NAME@sha256:DIGEST.")) -> None:
    """A version's manifest: family, digest, who pushed it, every file."""

    _show(resolve_model_ref(_store(), _ref(name)))


def rm(name: str = typer.Argument(..., help="NAME@VERSION.")) -> None:
    """Remove one version; blobs that another version still lists stay."""

    if "@" not in name or "@sha256:" in name:
        raise RegistryError(f"{name!r}: name the version to remove, NAME@VERSION")
    model, version = name.removeprefix(REGISTRY_PREFIX).split("@", 1)
    ref, removed = remove_version(_store(), model, version)
    console.print(f"removed {ref.name}@{ref.version} (sha256:{ref.digest[:12]}); {removed} unshared blobs deleted")


def prefetch(
    names: list[str] | None = typer.Argument(
        None, help="Models to warm: NAME, NAME@VERSION, ... (default: worker.prefetch_models)."
    ),
) -> None:
    """Download models into this host's cache (worker.model_dir) before its workers start; with
    no names, the ones in worker.prefetch_models (none: nothing to do)."""

    cfg = settings()
    names = names or cfg.worker.prefetch_models
    if not names:
        console.print("nothing to prefetch (give names, or set FARM_WORKER__PREFETCH_MODELS)")
        return
    store = open_store(cfg.storage, cfg.data_dir)
    models = host_model_store(cfg, store)
    for name in names:
        ref = resolve_model_ref(store, _ref(name))
        before = models.downloads
        folder = models.materialise(ref.digest)
        models.release(ref.digest)
        fetched = models.downloads - before
        console.print(f"{ref.name}@{ref.version}: {folder} ({fetched} blobs downloaded, {_mb(ref.size)})")


def import_checkpoint(
    checkpoint: Path = typer.Argument(..., help="An A1111/ComfyUI single-file .safetensors checkpoint."),
    family: str = typer.Option(..., "--family", help="sd15 or sdxl."),
    name: str = typer.Option(..., "--name", help="Registry name for the converted model."),
    config: Path = typer.Option(
        ...,
        "--config",
        help="A diffusers folder of the same family whose configs, tokenizer and scheduler are used "
        "(its weights are not); nothing is fetched from the hub.",
    ),
) -> None:
    """Convert a single-file checkpoint to a diffusers folder (offline) and push it."""

    from farm.worker.single_file import convert_single_file  # diffusers and torch: only this command

    cfg = settings()
    store = open_store(cfg.storage, cfg.data_dir)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="import-", dir=cfg.data_dir) as work:
        err_console.print(f"converting {checkpoint} ({family}) with the configs of {config}")
        folder = convert_single_file(checkpoint, family, config, Path(work) / "pipeline")
        result = push_model(store, folder, name, family)
    ref = result.ref
    console.print(f"imported {checkpoint.name} as {ref.name}@{ref.version} ({ref.family}, {_mb(ref.size)})")
    console.print(f"use it as: model: {REGISTRY_PREFIX}{ref.name}  (pinned: {ref.pinned})")


def add_commands(app: typer.Typer) -> None:
    """Add the registry commands to ``farm models``."""
    app.command("push")(push)
    app.command("list")(list_models)
    app.command("show")(show)
    app.command("rm")(rm)
    app.command("prefetch")(prefetch)
    app.command("import")(import_checkpoint)
