"""Running ``contact_sheet`` shards: the source job's sheet drawn from its outputs as they are now,
with the finalizer's layout (:func:`farm.manifest.contact_sheet`), every image it shows read and
checked against its sha256. A source that is itself a step (an ``upscale``: its items are parts,
not prompts and seeds) gets a plain grid of its images, each labelled with its file name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farm import sheets
from farm.manifest import (
    CONTACT_SHEET_MAX,
    MAX_COLUMNS,
    SheetSource,
    build_manifest,
    contact_sheet,
    planned_items,
    sheet_title,
)
from farm.worker.shard_run import ShardRun
from farm.worker.step_inputs import (
    SourceOutput,
    StepInputError,
    StepOutputs,
    decode_image,
    lineage_params,
    read_input,
    source_outputs,
)
from storage.db import session_scope
from storage.models import Job
from storage.objects.keys import artifact_key

if TYPE_CHECKING:
    from farm.kinds.contact_sheet import ContactSheetSpec

SHEET = "contact_sheet"


def _source(run: ShardRun) -> SheetSource:
    """The source job's manifest (its artifacts as the database has them now) and planned items."""
    spec: ContactSheetSpec = run.spec

    def read() -> SheetSource:
        with session_scope(run.res.session_factory) as session:
            job = session.get(Job, spec.source_job)
            if job is None:
                raise StepInputError(f"source job {spec.source_job} no longer exists")
            items = planned_items(session, job.id)
            summary = {
                "id": str(job.id),
                "kind": job.kind,
                "status": str(getattr(job.status, "value", job.status)),
                "items_done": job.items_done,
                "items_total": job.items_total,
                "shards": [],
            }
            manifest = build_manifest(session, job.id, summary, items)
            return SheetSource(manifest, items, spec.title or sheet_title(session, job))

    return run.res.outlast(read, f"shard {run.shard_id}: reading job {spec.source_job}", run.keeper.check)


def run_contact_sheet_shard(run: ShardRun) -> int:
    for item in run.items:
        if item["key"] not in run.done_keys:
            _draw(run, item)
    return run.items_done


def _draw(run: ShardRun, item: dict[str, Any]) -> None:
    spec: ContactSheetSpec = run.spec
    by_key = {output.key: output for output in source_outputs(run)}
    source = _source(run)
    shown: list[SourceOutput] = []
    changed: list[str] = []

    def load(key: str) -> Any:
        output = by_key.get(key)
        if output is None:  # not in the artifact rows read above: drawn as missing
            raise StepInputError(f"input {key}: not an output of the source job")
        try:
            data = read_input(run, output)
        except StepInputError as exc:
            changed.append(str(exc))
            raise
        shown.append(output)
        run.progress(0.9 * len(shown) / max(1, len(by_key)))
        return data

    if "source_job" in source.spec:  # a step (family cpu, or its source's for an img2img upscale)
        png = _step_sheet(source, [o for o in by_key.values() if o.is_image], load)
    else:
        png = contact_sheet(source, load)
    if changed:  # the sheet drew them as missing; a step refuses changed inputs
        raise StepInputError(f"{len(changed)} input(s) unusable; the first: {changed[0]}")
    if png is None or not shown:
        raise StepInputError(f"source job {spec.source_job} has no images to show on a contact sheet")
    outputs = StepOutputs.start(run, item)
    key = artifact_key(spec.output_prefix, run.job_id, run.shard_index, SHEET, "png")
    outputs.record(key, png, "image/png", lineage_params(run, shown, title=source.title), progress=0.95)
    outputs.finish(images=len(shown))


def _step_sheet(source: SheetSource, images: list[SourceOutput], load: Any) -> bytes | None:
    """The images of a step's outputs in key order, each captioned with its file name."""
    if not images:
        return None
    shown = images[:CONTACT_SHEET_MAX]
    tiles: list[sheets.Tile | None] = []
    for output in shown:
        image = decode_image(output, load(output.key))
        image.thumbnail((2 * sheets.TILE, 2 * sheets.TILE))
        tiles.append(sheets.Tile(image, (output.stem,)))
    rows = [tiles[i : i + MAX_COLUMNS] for i in range(0, len(tiles), MAX_COLUMNS)]
    kind = source.spec.get("kind", "step")
    subtitle = [f"{kind} | {len(images)} images"]
    legend = ["One tile per image, in key order, labelled with its file name."]
    if len(shown) < len(images):
        legend.append(f"Showing the first {len(shown)} of {len(images)} images; manifest.json lists all.")
    return sheets.to_png(sheets.compose(source.title, subtitle, sheets.image_grid(rows), legend))
