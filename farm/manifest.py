"""What a finished job leaves beside its outputs: ``manifest.json`` and a contact sheet PNG.

The contact sheet is for people: a title (the job's name and id), what was rendered, the outputs
laid out so they can be compared, and a legend. Stills are a grid of prompts (rows) x seeds
(columns), each tile captioned with its seed, prompt number and the start of its prompt; a bulk
job's rows are tiles in row order, captioned with their row ids; a video job has one row of
sampled frames per clip. An item without an output (its shard failed or was cancelled) is a
crossed-out tile saying so. At most :data:`CONTACT_SHEET_MAX` stills or :data:`MAX_CLIPS` clips
are shown; the legend says what was left out.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.errors import ObjectNotFound
from storage.models import Artifact, BulkJob, Job, Shard
from storage.objects import ObjectStore, manifest_key
from storage.objects.keys import contact_sheet_key

CONTACT_SHEET_MAX = 64  # still tiles on one sheet
MAX_COLUMNS = 8  # seeds (or bulk rows) per sheet row
MAX_CLIPS = 12  # clip rows on a video sheet
PROMPT_CHARS = 40  # of a prompt in a tile caption (then cut to the tile's width)
ITEM_FIELDS = ("prompt_index", "frame_index", "image_index", "row_id")  # an item's place, copied to its artifacts

Loader = Callable[[str], bytes]


def build_manifest(
    session: Session, job_id: uuid.UUID, summary: dict[str, Any], items: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The job (``summary`` without its shards), its spec, its shards and every artifact; an
    artifact also names its item's place (``prompt_index``, ``frame_index``, ``image_index`` or
    bulk ``row_id``) from the planned ``items`` (read from the shards when not given)."""
    job = session.get(Job, job_id)
    artifacts = session.scalars(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.item_index, Artifact.key)
    ).all()
    places = {int(item["index"]): item for item in (planned_items(session, job_id) if items is None else items)}
    return {
        "job": {k: v for k, v in summary.items() if k != "shards"},
        "spec": job.spec,
        "shards": summary["shards"],
        "artifacts": [
            {
                "key": a.key,
                "item_index": a.item_index,
                "seed": a.seed,
                "sha256": a.sha256,
                "size_bytes": a.size_bytes,
                "content_type": a.content_type,
                "model_hash": a.model_hash,
                "params": a.params,
                **{k: places[a.item_index][k] for k in ITEM_FIELDS if k in places.get(a.item_index, {})},
            }
            for a in artifacts
        ],
    }


def planned_items(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """Every render item of the job as its shards planned it (index, seed, prompt_index, ...),
    in item order, each with its shard's ``shard_status`` and ``shard_error``."""
    items: list[dict[str, Any]] = []
    rows = session.execute(
        select(Shard.params, Shard.status, Shard.error).where(Shard.job_id == job_id).order_by(Shard.index)
    )
    for params, status, error in rows:
        for item in (params or {}).get("items", ()):
            items.append({**item, "shard_status": str(getattr(status, "value", status)), "shard_error": error})
    return sorted(items, key=lambda item: int(item["index"]))


# -- the sheet -----------------------------------------------------------------------------------
@dataclass
class SheetSource:
    """What a contact sheet is drawn from: the manifest, the planned items, and a title."""

    manifest: dict[str, Any]
    items: list[dict[str, Any]]
    title: str
    notes: list[str] = field(default_factory=list)  # legend lines the layout adds

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest.get("spec") or {}

    @property
    def job(self) -> dict[str, Any]:
        return self.manifest.get("job") or {}


def contact_sheet(source: SheetSource, load: Loader) -> bytes | None:
    """The job's contact sheet as PNG bytes (``load`` reads an output by key), or ``None`` when
    the job has no items to show."""
    from farm import sheets

    if not source.items:
        return None
    kind = source.spec.get("kind") or source.job.get("kind")
    if kind == "temporal_video":
        body = _video_body(source, load)
    elif any("row_id" in item for item in source.items):
        body = _bulk_body(source, load)
    else:
        body = _grid_body(source, load)
    return sheets.to_png(sheets.compose(source.title, _subtitle(source), body, source.notes))


def _subtitle(source: SheetSource) -> list[str]:
    spec, job = source.spec, source.job
    status = job.get("status", "?")
    done, total = job.get("items_done", "?"), job.get("items_total", len(source.items))
    first = " | ".join(
        str(part)
        for part in (spec.get("kind") or job.get("kind"), spec.get("family"), spec.get("model"), status)
        if part not in (None, "")
    )
    settings = [f"{done}/{total} items"]
    if spec.get("steps") is not None:
        settings.append(f"{spec['steps']} steps")
    if spec.get("guidance") is not None:
        settings.append(f"guidance {spec['guidance']:g}")
    if spec.get("width") and spec.get("height"):
        settings.append(f"{spec['width']}x{spec['height']}")
    if spec.get("scheduler") and spec.get("kind") != "temporal_video":
        settings.append(str(spec["scheduler"]))
    if isinstance(spec.get("sag"), dict):
        settings.append(f"SAG {spec['sag'].get('scale', '?')}")
    if isinstance(spec.get("identity"), dict):
        settings.append(f"identity: {spec['identity'].get('method', '?')}")
    if spec.get("patches"):
        settings.append("patches: " + ", ".join(str(p.get("type", "?")) for p in spec["patches"]))
    return [first, " | ".join(settings)]


def _stills(source: SheetSource) -> dict[int, dict[str, Any]]:
    """item index -> its still (a PNG that is not a video frame) among the manifest's artifacts."""
    found: dict[int, dict[str, Any]] = {}
    for artifact in source.manifest.get("artifacts", ()):
        if artifact.get("content_type") == "image/png" and "frame" not in (artifact.get("params") or {}):
            found.setdefault(int(artifact["item_index"]), artifact)
    return found


def _why_missing(item: dict[str, Any]) -> str:
    status = item.get("shard_status") or ""
    return {"failed": "failed", "cancelled": "cancelled"}.get(status, "no image")


def _image(load: Loader, key: str) -> Any:
    """An output as a small RGB image (at most twice a tile: 64 full-size stills would not fit in
    memory), or ``None`` when it is gone or unreadable (its tile says so; the sheet is still written).
    A store that is down raises: the finalizer waits it out."""
    from PIL import Image

    from farm import sheets

    try:
        with Image.open(io.BytesIO(load(key))) as image:
            image.draft("RGB", (2 * sheets.TILE, 2 * sheets.TILE))
            small = image.convert("RGB")
    except (ObjectNotFound, OSError, ValueError, Image.DecompressionBombError):
        return None
    small.thumbnail((2 * sheets.TILE, 2 * sheets.TILE))
    return small


def _prompt(item: dict[str, Any], prompts: Sequence[str]) -> str:
    if isinstance(item.get("prompt"), str):
        return item["prompt"]
    index = int(item.get("prompt_index", 0))
    return prompts[index] if 0 <= index < len(prompts) else ""


def _short(text: str, chars: int = PROMPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 3].rstrip() + "..."


def _frame_name(ref: Any, index: int) -> str:
    if isinstance(ref, dict):
        return str(ref.get("name") or ref.get("key") or f"frame {index + 1}")
    return f"frame {index + 1}"


def _grid_body(source: SheetSource, load: Loader) -> Any:
    """Stills as prompts (rows; with identity frames, frame x prompt) x seeds (columns)."""
    from farm import sheets

    spec = source.spec
    prompts = list(spec.get("prompts") or [])
    frames = list(spec.get("frames") or []) if isinstance(spec.get("frames"), list) else []
    row_keys: list[tuple[int | None, int]] = []
    seeds: list[int] = []
    cells: dict[tuple[tuple[int | None, int], int], dict[str, Any]] = {}
    for item in source.items:
        frame = item.get("frame_index")
        key = (int(frame) if frame is not None else None, int(item.get("prompt_index", 0)))
        seed = int(item["seed"])
        if key not in row_keys:
            row_keys.append(key)
        if seed not in seeds:
            seeds.append(seed)
        cells.setdefault((key, seed), item)
    columns = seeds[:MAX_COLUMNS]
    shown_rows = row_keys[: max(1, CONTACT_SHEET_MAX // len(columns))]
    outputs = _stills(source)

    def label(key: tuple[int | None, int]) -> str:
        frame, prompt = key
        return f"P{prompt + 1}" if frame is None else f"F{frame + 1} P{prompt + 1}"

    rows: list[list[sheets.Tile | None]] = []
    for key in shown_rows:
        row: list[sheets.Tile | None] = []
        for seed in columns:
            item = cells.get((key, seed))
            if item is None:
                row.append(None)
                continue
            output = outputs.get(int(item["index"]))
            image = _image(load, output["key"]) if output else None
            caption = (f"seed {seed} | {label(key)}", _short(_prompt(item, prompts)))
            row.append(sheets.Tile(image, caption, "missing" if output else _why_missing(item)))
        rows.append(row)
    rows_are = "identity frame x prompt" if frames else "prompts"
    numbers = "frame and prompt number" if frames else "prompt number"
    notes = [
        f"Rows: {rows_are} ({', '.join(label(k) for k in shown_rows)}). Columns: seeds. "
        f"Each tile: seed | {numbers}, then the start of the prompt."
    ]
    shown_prompts = sorted({prompt for _, prompt in shown_rows})
    notes += [f"P{i + 1}: {prompts[i]}" for i in shown_prompts if i < len(prompts)]
    if frames:
        shown_frames = sorted({frame for frame, _ in shown_rows if frame is not None})
        notes += [f"F{i + 1}: {_frame_name(frames[i], i)}" for i in shown_frames if i < len(frames)]
    if spec.get("negative_prompt"):
        notes.append(f"Negative prompt: {spec['negative_prompt']}")
    left_out = []
    if len(columns) < len(seeds):
        left_out.append(f"the first {len(columns)} of {len(seeds)} seeds")
    if len(shown_rows) < len(row_keys):
        left_out.append(f"the first {len(shown_rows)} of {len(row_keys)} rows")
    if left_out:
        notes.append(f"Showing {' and '.join(left_out)}; manifest.json lists every output.")
    if any(tile is not None and tile.image is None for row in rows for tile in row):
        notes.append("A crossed-out tile has no image: its shard failed or was cancelled (see farm status JOB).")
    source.notes.extend(notes)
    return sheets.image_grid(rows, [label(k) for k in shown_rows], [f"seed {s}" for s in columns])


def _bulk_body(source: SheetSource, load: Loader) -> Any:
    """A bulk job's rows in manifest order, each tile captioned with its row id and seed."""
    from farm import sheets

    prompts = list(source.spec.get("prompts") or [])
    items = source.items[:CONTACT_SHEET_MAX]
    outputs = _stills(source)
    columns = min(MAX_COLUMNS, math.ceil(math.sqrt(len(items))))
    tiles: list[sheets.Tile | None] = []
    for item in items:
        output = outputs.get(int(item["index"]))
        image = _image(load, output["key"]) if output else None
        caption = (str(item.get("row_id", "?")), f"seed {item['seed']}", _short(_prompt(item, prompts)))
        tiles.append(sheets.Tile(image, caption, "missing" if output else _why_missing(item)))
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    source.notes.append("One tile per manifest row, in manifest order: its row id, seed and the start of its prompt.")
    if len(items) < len(source.items):
        source.notes.append(f"Showing the first {len(items)} of {len(source.items)} rows; manifest.json lists all.")
    if any(t is not None and t.image is None for t in tiles):
        source.notes.append("A crossed-out tile has no image: its shard failed or was cancelled.")
    return sheets.image_grid(rows)


def _video_body(source: SheetSource, load: Loader) -> Any:
    """One row per clip: frames sampled across the whole clip, numbered, with the clip's caption."""
    from farm.media import ClipRow, clip_rows, sample_frames

    spec = source.spec
    images = list(spec.get("images") or [])
    per_segment = int(spec.get("num_frames", 0))
    frames_per_clip = per_segment * int(spec.get("segments", 1)) or None
    frame_keys: dict[int, dict[int, str]] = {}
    for artifact in source.manifest.get("artifacts", ()):
        params = artifact.get("params") or {}
        if artifact.get("content_type") == "image/png" and "frame" in params:
            frame_keys.setdefault(int(artifact["item_index"]), {})[int(params["frame"])] = artifact["key"]
    clips = source.items[:MAX_CLIPS]
    rows = []
    for number, item in enumerate(clips, start=1):
        index = item.get("image_index")
        image_name = (
            _frame_name(images[int(index)], int(index)) if index is not None and int(index) < len(images) else "?"
        )
        have = frame_keys.get(int(item["index"]), {})
        count = frames_per_clip or (max(have) + 1 if have else 0)
        fps = spec.get("fps")
        caption = (
            f"clip {number}: image {int(index) + 1 if index is not None else '?'} '{image_name}' | seed {item['seed']}"
            f" | {count} frames{f' at {fps} fps' if fps else ''}"
        )
        sampled = [(f, have[f]) for f in sample_frames(count) if f in have]
        frames = [(_frame_label(f, per_segment), img) for f, key in sampled if (img := _image(load, key)) is not None]
        note = (
            "no frames"
            if item.get("shard_status") == "succeeded"
            else _why_missing(item).replace("no image", "no frames")
        )
        if not frames and item.get("shard_error"):
            caption += f" | {note}: {item['shard_error']}"
        rows.append(ClipRow(caption, frames, note))
    segments = int(spec.get("segments", 1))
    source.notes.append(
        "One row per clip: frames sampled evenly from its first to its last, numbered f<frame>"
        + (
            f" (s<n>: the first frame of segment n; {segments} segments of {per_segment} frames)"
            if segments > 1
            else ""
        )
        + "; each clip's mp4 and GIF preview lie beside its frames."
    )
    if len(clips) < len(source.items):
        source.notes.append(f"Showing the first {len(clips)} of {len(source.items)} clips; manifest.json lists all.")
    if any(not row.frames for row in rows):
        source.notes.append("A crossed-out strip has no frames: its shard failed or was cancelled.")
    return clip_rows(rows)


def _frame_label(frame: int, per_segment: int) -> str:
    """``f7``, or ``f7 s2`` where frame 7 starts the clip's second segment."""
    if per_segment and frame and frame % per_segment == 0:
        return f"f{frame} s{frame // per_segment + 1}"
    return f"f{frame}"


def sheet_title(session: Session, job: Job) -> str:
    """``<name> | job <id>``: the job's idempotency key or its bulk run's name, when it has one."""
    name = job.idempotency_key
    if job.bulk_id is not None:
        bulk = session.get(BulkJob, job.bulk_id)
        name = f"bulk {bulk.name}" if bulk is not None else name
    return f"{name} | job {job.id}" if name else f"job {job.id}"


def write_job_outputs(session: Session, store: ObjectStore, job_id: uuid.UUID, summary: dict[str, Any]) -> dict:
    """Write the contact sheet and the manifest; returns the manifest (with the sheet's key)."""
    items = planned_items(session, job_id)
    manifest = build_manifest(session, job_id, summary, items)
    job = session.get(Job, job_id)
    prefix = job.output_prefix
    source = SheetSource(manifest, items, sheet_title(session, job))
    sheet = contact_sheet(source, store.get_bytes)
    if sheet is not None:
        key = contact_sheet_key(prefix, job_id)
        store.put_bytes(key, sheet, content_type="image/png")
        manifest["contact_sheet"] = key
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    store.put_bytes(manifest_key(prefix, job_id), data, content_type="application/json")
    manifest["manifest"] = manifest_key(prefix, job_id)
    return manifest
