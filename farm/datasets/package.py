"""Packaging a bulk job's rendered rows as a dataset: shards of ``shard_size`` samples, a stats
JSON per shard, ``manifest.json`` and the dataset card, in a local folder or the store.

Rows are taken in key order (the row id decides it) and images are streamed from the store one
at a time; each image is checked against the sha256 the database recorded. Failed rows (and rows
whose image is missing or changed) go into the stats of the shard their key falls in, never into
a shard; failures after the last rendered row wait for a later shard, and ``manifest.json``
always lists every failed row there is now, with its reason.

Incremental: ``manifest.json`` lists each finished shard with its sha256, size, row ids and
counts. Packaging again writes new shards from the rows no listed shard holds and never touches
a listed shard. A shard is listed only after it was committed whole (see
:mod:`farm.datasets.targets`); one a killed run wrote but did not list is removed and written
again. The manifest is rewritten after the first shard, then at most every ``flush_every_s``
seconds, and at the end.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.bulk import get_bulk
from farm.datasets.card import dataset_card
from farm.datasets.file_shards import SUMS
from farm.datasets.formats import FORMATS, Format
from farm.datasets.parquet_shards import check_available
from farm.datasets.rows import FailedRow, RenderedRow, Sample, count_rendered, failed_rows, rendered_rows
from farm.datasets.targets import FolderTarget, StoreTarget, committed, open_target
from farm.errors import ObjectNotFound, UserError
from farm.file_digests import file_sha256
from storage.db import session_scope
from storage.models import utcnow

if TYPE_CHECKING:
    from storage.objects import ObjectStore

MANIFEST = "manifest.json"
CARD = "README.md"
MANIFEST_VERSION = 1
MAX_SHARD_SIZE = 1_000_000
_SHARD_NAME = re.compile(r"(\d{5,})(\.tar|\.parquet|_stats\.json|/.+)")


def default_out(name: str, format: str) -> str:
    """Where ``farm bulk package`` writes without ``--out``: ``store:packages/{name}/{format}``."""
    return f"store:packages/{name}/{format}"


def _digest(path: Path) -> tuple[str, int]:
    """The shard's sha256 (a folder's: its ``SHA256SUMS`` file's) and its size in bytes."""
    if path.is_dir():
        return file_sha256(path / SUMS), sum(p.stat().st_size for p in path.iterdir())
    return file_sha256(path), path.stat().st_size


def _load_manifest(target: FolderTarget | StoreTarget, name: str, format: str) -> dict[str, Any]:
    data = target.read(MANIFEST)
    if data is None:
        if next(iter(target.names()), None) is not None:  # never remove what another tool wrote there
            raise UserError(
                f"--out: {target.describe()} is not empty and holds no package (no {MANIFEST}); "
                "give an empty or new folder or key"
            )
        now = utcnow().isoformat()
        manifest = {"manifest_version": MANIFEST_VERSION, "name": name, "format": format, "created_at": now}
        manifest["shards"] = []
        target.write(MANIFEST, json.dumps(manifest).encode())  # the folder is the package's from now on
        return manifest
    manifest = json.loads(data)
    if (manifest.get("name"), manifest.get("format")) != (name, format):
        raise UserError(
            f"--out: {target.describe()} holds the {manifest.get('format')} package of bulk job "
            f"{manifest.get('name')!r}; give another --out for the {format} package of {name!r}"
        )
    return manifest


def _remove_unlisted(target: FolderTarget | StoreTarget, manifest: dict[str, Any]) -> int:
    """Remove shards (and their stats) a killed run wrote but never listed; returns how many names."""
    listed = {shard["name"] for shard in manifest["shards"]}
    stray = set()
    for name in target.names():
        match = _SHARD_NAME.fullmatch(name)
        if match is None:
            continue
        shard = match.group(1) + ("" if match.group(2).startswith("/") else match.group(2))
        if shard.endswith("_stats.json"):
            shard = shard.removesuffix("_stats.json")
        if not {shard, f"{shard}.tar", f"{shard}.parquet"} & listed:
            stray.add(name.split("/", 1)[0] if "/" in name else name)
    for name in sorted(stray):
        target.remove(name)
    return len(stray)


def _todo(
    session_factory: Any, bulk_id: Any, failures: list[FailedRow], manifest: dict[str, Any]
) -> Iterator[RenderedRow | FailedRow]:
    """Rows for new shards, in key order: rendered rows no listed shard holds, and failed rows no
    listed shard's stats has reported yet."""
    packaged = {row for shard in manifest["shards"] for row in shard["row_ids"]}
    reported = {row for shard in manifest["shards"] for row in shard["failed"]}
    rendered = (row for row in rendered_rows(session_factory, bulk_id) if row.row_id not in packaged)
    failed = (row for row in failures if row.row_id not in reported)
    return heapq.merge(rendered, failed, key=lambda row: row.key)


def _fetch(store: ObjectStore, row: RenderedRow) -> bytes | FailedRow:
    try:
        image = store.get_bytes(row.key)
    except ObjectNotFound:
        return FailedRow(row.row_id, row.key, "image missing from the store")
    if hashlib.sha256(image).hexdigest() != row.sha256:
        return FailedRow(row.row_id, row.key, "image in the store differs from its recorded sha256")
    return image


class _ShardFill:
    """Pulls rows for one shard: at most ``size`` samples, the failures met on the way, and what
    the stats and the manifest record (row ids, models, render dates, image bytes)."""

    def __init__(self, rows: Iterator[RenderedRow | FailedRow], store: ObjectStore, size: int) -> None:
        self.rows, self.store, self.size = rows, store, size
        self.first: Sample | None = None
        self.failures: list[FailedRow] = []
        self.row_ids: list[str] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.rendered: list[str] = []
        self.image_bytes = 0
        self.unreadable: list[FailedRow] = []  # rendered rows whose image could not be packaged

    def _next_sample(self) -> Sample | None:
        for row in self.rows:
            if isinstance(row, FailedRow):
                self.failures.append(row)
                continue
            image = _fetch(self.store, row)
            if isinstance(image, FailedRow):
                self.failures.append(image)
                self.unreadable.append(image)
                continue
            return Sample(row, image)
        return None

    def start(self) -> bool:
        """Find the shard's first sample; ``False`` when no rendered row is left."""
        self.first = self._next_sample()
        return self.first is not None

    def samples(self) -> Iterator[Sample]:
        sample, count = self.first, 0
        self.first = None
        while sample is not None:
            row = sample.row
            self.row_ids.append(row.row_id)
            model = self.models.setdefault(row.model_hash or "", {"model": row.params.get("model"), "rows": 0})
            model["rows"] += 1
            self.rendered.append(row.rendered_at.isoformat())
            self.image_bytes += len(sample.image)
            yield sample
            count += 1
            sample = self._next_sample() if count < self.size else None


def package_bulk(
    session_factory: Any,
    store: ObjectStore,
    name: str,
    format: str,
    shard_size: int = 1000,
    out: str | None = None,
    *,
    flush_every_s: float = 5.0,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Package the rendered rows of bulk job ``name`` that no earlier run packaged into ``out``
    (``store:<prefix>`` or a local folder; default :func:`default_out`) as ``format``
    (``webdataset``, ``parquet`` or ``files``), ``shard_size`` samples per shard. ``on_shard``
    is called with each new shard's manifest entry. Returns what was done and the package's
    counts."""
    fmt = FORMATS.get(format)
    if fmt is None:
        raise UserError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise UserError(f"--shard-size: {shard_size} is outside 1..{MAX_SHARD_SIZE}")
    if format == "parquet":
        check_available()
    with session_scope(session_factory) as session:
        bulk = get_bulk(session, name)
        bulk_id, rows_total = bulk.id, bulk.rows_total
        failures = failed_rows(session, bulk_id)
        rendered_total = count_rendered(session, bulk_id)
    target = open_target(out or default_out(name, format), store)
    target.sweep()
    manifest = _load_manifest(target, name, format)
    removed = _remove_unlisted(target, manifest)
    rows = _todo(session_factory, bulk_id, failures, manifest)
    started, flushed = time.monotonic(), float("-inf")  # the first shard is listed at once
    new: list[dict[str, Any]] = []
    unreadable: list[FailedRow] = []
    while True:
        fill = _ShardFill(rows, store, shard_size)
        if not fill.start():
            unreadable.extend(fill.unreadable)
            break
        entry = _write_shard(target, fmt, fill, len(manifest["shards"]), shard_size)
        unreadable.extend(fill.unreadable)
        manifest["shards"].append(entry)
        new.append(entry)
        if on_shard is not None:
            on_shard(entry)
        if time.monotonic() - flushed >= flush_every_s:
            _save(target, manifest, rows_total, rendered_total, failures, unreadable)
            flushed = time.monotonic()
    manifest.setdefault("runs", []).append(
        {
            "at": utcnow().isoformat(),
            "shards": [e["name"] for e in new],
            "rows": sum(e["samples"] for e in new),
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    _save(target, manifest, rows_total, rendered_total, failures, unreadable)
    target.write(CARD, dataset_card(manifest).encode())
    return {
        "name": name,
        "format": format,
        "out": target.describe(),
        "new_shards": len(new),
        "new_rows": sum(e["samples"] for e in new),
        "new_bytes": sum(e["bytes"] for e in new),
        "removed_unlisted": removed,
        "shards": len(manifest["shards"]),
        **manifest["rows"],
    }


def _write_shard(
    target: FolderTarget | StoreTarget, fmt: Format, fill: _ShardFill, index: int, shard_size: int
) -> dict[str, Any]:
    """Write one shard and its stats JSON; returns its manifest entry."""
    name = f"{index:05d}{fmt.suffix}"
    stats_name = f"{index:05d}_stats.json"
    began = time.monotonic()
    with committed(target, name) as path:
        count = fmt.write(path, fill.samples())
        sha256, size = _digest(path)
    entry = {
        "name": name,
        "sha256": sha256,
        "bytes": size,
        "samples": count,
        "row_ids": fill.row_ids,
        "failed": [row.row_id for row in fill.failures],
        "stats": stats_name,
        "models": fill.models,
        "first_rendered_at": min(fill.rendered),
        "last_rendered_at": max(fill.rendered),
        "written_at": utcnow().isoformat(),
        "shard_size": shard_size,
    }
    stats = {
        "shard": name,
        "format": fmt.name,
        "sha256": sha256,
        "bytes": size,
        "image_bytes": fill.image_bytes,
        "successes": count,
        "failures": len(fill.failures),
        "failed_rows": [row.as_json() for row in fill.failures],
        "models": fill.models,
        "first_rendered_at": entry["first_rendered_at"],
        "last_rendered_at": entry["last_rendered_at"],
        "written_at": entry["written_at"],
        "seconds": round(time.monotonic() - began, 3),
    }
    target.write(stats_name, json.dumps(stats, indent=2).encode())
    return entry


def _save(
    target: FolderTarget | StoreTarget,
    manifest: dict[str, Any],
    rows_total: int,
    rendered_total: int,
    failures: list[FailedRow],
    unreadable: list[FailedRow],
) -> None:
    packaged = sum(shard["samples"] for shard in manifest["shards"])
    failed = {row.key: row for row in [*failures, *unreadable]}
    manifest["updated_at"] = utcnow().isoformat()
    manifest["rows"] = {
        "total": rows_total,
        "packaged": packaged,
        "failed": len(failed),
        "pending": max(rows_total - rendered_total - len(failures), 0),
        "rendered_not_packaged": max(rendered_total - packaged, 0),
    }
    manifest["failed"] = [row.as_json() for row in sorted(failed.values(), key=lambda row: row.key)]
    target.write(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
