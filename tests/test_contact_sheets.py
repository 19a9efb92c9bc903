"""Contact sheets people can read, written by ``write_job_outputs`` from a real SQLite database and
a real local store: jobs are submitted and scheduled as usual, their shards claimed and finished
through the leases module, and each item's output written where a worker writes it (the
pictures are drawn here, so each tile's content is known). The sheet is then decoded and checked
for its layout: title and legend bands, one tile per prompt x seed (one row per clip for video),
crossed-out tiles for failed shards."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from farm import sheets
from farm.manifest import write_job_outputs
from farm.media import SHEET_FRAMES, sample_frames
from farm.scheduler import finalize_job, job_summary, schedule_job, submit_job
from farm.specs import parse_spec
from storage.leases import claim_shard, finish_shard
from storage.models import Artifact, Shard
from storage.objects.local import LocalStore
from storage.status import ShardStatus

PALETTE = [(200, 60, 50), (60, 140, 70), (50, 90, 190), (210, 160, 40), (140, 70, 160), (40, 150, 160)]
SHA = hashlib.sha256(b"start").hexdigest()


def picture(prompt_index: int, seed: int, size: tuple[int, int] = (96, 96)) -> bytes:
    """A still whose colour is its prompt and whose bar is its seed: easy to tell apart on a sheet."""
    image = Image.new("RGB", size, PALETTE[prompt_index % len(PALETTE)])
    draw = ImageDraw.Draw(image)
    x = (seed * 17) % (size[0] - 12)
    draw.rectangle((x, 0, x + 12, size[1] // 2), fill=(245, 245, 245))  # half height: one block
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def frame(clip: int, number: int, total: int, size: tuple[int, int] = (128, 72)) -> bytes:
    """A video frame: a ball crossing the picture, so sampled frames show the motion."""
    image = Image.new("RGB", size, PALETTE[clip % len(PALETTE)])
    draw = ImageDraw.Draw(image)
    x = round((size[0] - 20) * number / max(1, total - 1))
    draw.ellipse((x, size[1] // 2 - 10, x + 20, size[1] // 2 + 10), fill=(250, 250, 250))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def run_job(session: Any, store: LocalStore, job_id: uuid.UUID, fail: set[int] = frozenset()) -> dict[str, Any]:
    """Render every shard of a scheduled job as a worker would (failing the shards in ``fail``),
    finalize it and write its outputs; returns the manifest."""
    shards = session.query(Shard).filter(Shard.job_id == job_id).order_by(Shard.index).all()
    for shard in shards:
        lease = claim_shard(session, shard.id, "sheet-test", 60)
        if shard.index in fail:
            finish_shard(session, lease, ShardStatus.FAILED, error="no face detected")
            continue
        spec = shard.job.spec
        for item in shard.params["items"]:
            outputs = _outputs_of(spec, item)
            for key, data, params in outputs:
                store.put_bytes(key, data, content_type="image/png")
                session.add(
                    Artifact(
                        job_id=job_id,
                        shard_id=shard.id,
                        key=key,
                        item_index=item["index"],
                        seed=item["seed"],
                        sha256=hashlib.sha256(data).hexdigest(),
                        size_bytes=len(data),
                        content_type="image/png",
                        params=params,
                        fencing_token=lease.fencing_token,
                    )
                )
        finish_shard(session, lease, ShardStatus.SUCCEEDED, items_done=len(shard.params["items"]))
    session.flush()
    finalize_job(session, job_id)
    session.expire_all()  # the transitions update rows in SQL, behind the ORM's back
    return write_job_outputs(session, store, job_id, job_summary(session, job_id))


def _outputs_of(spec: dict[str, Any], item: dict[str, Any]) -> list[tuple[str, bytes, dict[str, Any]]]:
    if spec.get("kind") == "temporal_video":
        total = spec["num_frames"] * spec["segments"]
        stem = item["key"].removesuffix(".mp4")
        return [
            (f"{stem}-f{n:05d}.png", frame(int(item["image_index"]) + int(item["seed"]), n, total), {"frame": n})
            for n in range(total)
        ]
    prompt = item.get("prompt") or spec["prompts"][item["prompt_index"]]
    return [(item["key"], picture(int(item.get("prompt_index", 0)), int(item["seed"])), {"prompt": prompt})]


def submit(session: Any, spec: dict[str, Any]) -> uuid.UUID:
    job, _ = submit_job(session, parse_spec(spec))
    schedule_job(session, job.id)
    session.flush()
    return job.id


@pytest.fixture
def session(session_factory):
    with session_factory() as s:
        yield s


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url")


def sheet_of(store: LocalStore, manifest: dict[str, Any]) -> Image.Image:
    with Image.open(io.BytesIO(store.get_bytes(manifest["contact_sheet"]))) as image:
        return image.convert("RGB")


def blocks(sheet: Image.Image, colours: list[tuple[int, int, int]], step: int = 4) -> int:
    """How many picture-sized blocks painted in ``colours`` the sheet holds: connected regions
    (sampled every ``step`` pixels) of at least a quarter tile. Text is never that big."""
    pixels = np.asarray(sheet)[::step, ::step]
    mask = np.zeros(pixels.shape[:2], dtype=bool)
    for colour in colours:
        mask |= np.all(pixels == colour, axis=-1)
    seen = np.zeros_like(mask)
    count, least = 0, (sheets.TILE // (2 * step)) ** 2 // 2
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        count += size >= least
    return count


def tiles_in(sheet: Image.Image, colours: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], int]:
    return {colour: blocks(sheet, [colour]) for colour in colours}


def crossed_out(sheet: Image.Image) -> int:
    return blocks(sheet, [sheets.EMPTY, sheets.CROSS])


def full_width_rules(sheet: Image.Image) -> int:
    """Horizontal rules across the whole sheet (between clips, above the legend)."""
    pixels = np.asarray(sheet)[:, sheets.PAD : sheet.width - sheets.PAD]
    rows = np.nonzero(np.all(pixels == sheets.RULE, axis=(1, 2)))[0]
    return len([y for i, y in enumerate(rows) if i == 0 or rows[i - 1] != y - 1])


SPEC = {
    "model": "./models/tiny-sd15",
    "family": "sd15",
    "prompts": [
        "a lighthouse on a cliff at dusk, oil painting, dramatic sky",
        "a lighthouse on a cliff at dawn, watercolour",
        "a red fox in the snow",
    ],
    "seeds": [1234, 1235, 1236, 1237],
    "steps": 20,
    "width": 96,
    "height": 96,
    "shard_size": 4,
    "output_prefix": "sheets",
    "idempotency_key": "lighthouse-sweep-v1",
}


def test_stills_are_laid_out_prompts_by_seeds_with_captions_title_and_legend(session, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    job_id = submit(session, SPEC)
    manifest = run_job(session, store, job_id)
    sheet = sheet_of(store, manifest)
    (tmp_path / "stills.png").write_bytes(store.get_bytes(manifest["contact_sheet"]))
    # 3 prompts (rows) x 4 seeds (columns): each prompt's colour appears once per seed.
    assert tiles_in(sheet, PALETTE[:3]) == {PALETTE[0]: 4, PALETTE[1]: 4, PALETTE[2]: 4}
    columns = sheet.width - 2 * sheets.PAD
    assert columns >= 4 * sheets.TILE + 3 * sheets.GAP
    assert sheet.height > 3 * sheets.TILE + 60  # title above, legend below
    # The manifest keeps its fields and tells each output's place.
    assert {"job", "spec", "shards", "artifacts", "contact_sheet", "manifest"} <= set(manifest)
    first = manifest["artifacts"][0]
    assert {"key", "item_index", "seed", "sha256", "params", "prompt_index"} <= set(first)
    assert [a["prompt_index"] for a in manifest["artifacts"]] == [0] * 4 + [1] * 4 + [2] * 4


def test_a_failed_shard_leaves_crossed_out_tiles_and_a_note(session, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    job_id = submit(session, {**SPEC, "idempotency_key": None, "shard_size": 2})
    manifest = run_job(session, store, job_id, fail={3})  # prompt 2, seeds 1236 and 1237
    sheet = sheet_of(store, manifest)
    (tmp_path / "partial.png").write_bytes(store.get_bytes(manifest["contact_sheet"]))
    assert manifest["job"]["status"] == "partial"
    assert tiles_in(sheet, PALETTE[:3]) == {PALETTE[0]: 4, PALETTE[1]: 2, PALETTE[2]: 4}
    assert crossed_out(sheet) == 2


def test_many_prompts_and_seeds_are_cut_to_one_readable_sheet(session, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    spec = {**SPEC, "idempotency_key": None, "prompts": [f"prompt number {i}" for i in range(12)], "shard_size": 32}
    spec.pop("seeds")
    job_id = submit(session, {**spec, "base_seed": 0, "count": 10})
    manifest = run_job(session, store, job_id)
    sheet = sheet_of(store, manifest)
    (tmp_path / "many.png").write_bytes(store.get_bytes(manifest["contact_sheet"]))
    # 8 seeds x 8 prompts: prompts 0..7 have palette colours 0..5, 0, 1 (prompts 8..11, colours
    # 2..5 again, are left out), 8 tiles each.
    counts = tiles_in(sheet, PALETTE)
    assert counts == {PALETTE[0]: 16, PALETTE[1]: 16, PALETTE[2]: 8, PALETTE[3]: 8, PALETTE[4]: 8, PALETTE[5]: 8}
    assert sheet.width < 8 * (sheets.TILE + sheets.GAP) + 200


def test_identity_frames_make_frame_by_prompt_rows(session, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    ref = {"key": f"inputs/sha256/{SHA}.png", "sha256": SHA, "name": "me.png"}
    spec = {
        **SPEC,
        "idempotency_key": None,
        "kind": "face_identity",
        "prompts": SPEC["prompts"][:2],
        "seeds": [7, 8],
        "identity": {"method": "ip_adapter", "adapter": "/m/ip.safetensors", "image_encoder": "/m/enc",
                     "references": [ref]},
        "frames": [ref, {**ref, "name": "pose-2.png"}],
    }  # fmt: skip
    manifest = run_job(session, store, submit(session, spec))
    sheet = sheet_of(store, manifest)
    (tmp_path / "identity.png").write_bytes(store.get_bytes(manifest["contact_sheet"]))
    assert tiles_in(sheet, PALETTE[:2]) == {PALETTE[0]: 4, PALETTE[1]: 4}  # 2 frames x 2 prompts x 2 seeds
    assert {a["frame_index"] for a in manifest["artifacts"]} == {0, 1}


def test_bulk_rows_are_tiles_captioned_by_row_id(session, tmp_path: Path) -> None:
    from farm.bulk import submit_bulk
    from farm.bulk_manifest import read_manifest

    store = LocalStore(tmp_path / "objects")
    rows = read_manifest(
        "\n".join(json.dumps({"id": f"portrait-{i:03d}", "prompt": f"portrait {i}"}) for i in range(5)).encode(),
        "rows.jsonl",
    )
    base = {k: v for k, v in SPEC.items() if k != "idempotency_key"}
    submit_bulk(session, "portraits-v1", base, rows)
    session.flush()
    job_id = session.query(Shard.job_id).first()[0]
    manifest = run_job(session, store, job_id)
    sheet = sheet_of(store, manifest)
    (tmp_path / "bulk.png").write_bytes(store.get_bytes(manifest["contact_sheet"]))
    assert tiles_in(sheet, PALETTE[:1]) == {PALETTE[0]: 5}
    assert [a["row_id"] for a in manifest["artifacts"]] == [f"portrait-{i:03d}" for i in range(5)]


def test_video_clips_are_rows_of_sampled_frames(session, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    images = [{"key": f"inputs/sha256/{SHA}.png", "sha256": SHA, "name": "lighthouse.png"},
              {"key": f"inputs/sha256/{SHA}.png", "sha256": SHA, "name": "harbour.png"}]  # fmt: skip
    spec = {
        "kind": "temporal_video",
        "model": "./models/tiny-svd",
        "family": "svd",
        "images": images,
        "seeds": [5, 6],
        "num_frames": 7,
        "segments": 2,
        "fps": 7,
        "steps": 2,
        "width": 128,
        "height": 72,
        "output_prefix": "videos",
    }
    manifest = run_job(session, store, submit(session, spec), fail={3})
    sheet = sheet_of(store, manifest)
    (tmp_path / "video.png").write_bytes(store.get_bytes(manifest["contact_sheet"]))
    # Clips 1..3 rendered, clip 4 failed. A clip's colour is its image index + seed: clip 1 (0, 5)
    # palette 5, clips 2 (0, 6) and 3 (1, 5) palette 0; 8 of each clip's 14 frames are shown.
    assert tiles_in(sheet, [PALETTE[5], PALETTE[0], PALETTE[1]]) == {PALETTE[5]: 8, PALETTE[0]: 16, PALETTE[1]: 0}
    assert crossed_out(sheet) == 1
    assert full_width_rules(sheet) == 4  # between the 4 clips, and above the legend


def test_frame_sampling_spreads_over_the_clip() -> None:
    assert sample_frames(5) == [0, 1, 2, 3, 4]
    assert sample_frames(14) == [0, 2, 4, 6, 7, 9, 11, 13]
    assert len(sample_frames(448)) == SHEET_FRAMES and sample_frames(448)[-1] == 447
    assert sample_frames(0) == [] and sample_frames(3, 1) == [0]


def test_text_is_fitted_to_the_tile() -> None:
    long = "a lighthouse on a cliff at dusk, oil painting, dramatic sky, very detailed"
    cut = sheets.fit(long, sheets.SMALL_SIZE, sheets.TILE)
    assert cut.endswith("...") and sheets.text_width(cut, sheets.SMALL_SIZE) <= sheets.TILE
    assert sheets.fit("short", sheets.SMALL_SIZE, sheets.TILE) == "short"
    lines = sheets.wrap(long * 3, sheets.TEXT_SIZE, 300, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("...")
