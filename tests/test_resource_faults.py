"""Out of memory during a render, in a real worker process: the shard fails as retryable with
smaller settings for the next attempt (fewer frames decoded at once, tiled image decoding), never
at identical parameters; when nothing is left to lower it fails for good; the worker frees memory
and keeps serving, and its resident pipeline is left as it was.

The fault comes from ``tests/fixtures/faults/sitecustomize.py`` (on the worker's PYTHONPATH): the
VAEs raise ``torch.OutOfMemoryError`` above a pixel budget or when decoding an image untiled.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from farm.worker.memory import lower_limits
from tests.fixtures.farm import ROOT, text_job

FAULTS = Path(__file__).resolve().parent / "fixtures" / "faults"


def _budget(model: Path) -> int:
    """Latent cells of two 64x64 frames for this model's VAE: the most one decode call may take."""
    vae = json.loads((model / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return 2 * (64 // scale) ** 2


def _video_job(model: Path, image: Path, **overrides) -> dict:
    spec = {
        "kind": "temporal_video",
        "model": str(model),
        "family": "svd",
        "images": [{"path": str(image)}],
        "seeds": [5],
        "num_frames": 4,
        "segments": 1,
        "steps": 2,
        "width": 64,
        "height": 64,
        "fps": 6,
        "decode_chunk_size": 4,
        "output_prefix": "oom",
    }
    spec.update(overrides)
    return spec


def _params(pg_url: str, job_id) -> list[dict]:
    """The recorded parameters of the job's outputs."""
    from sqlalchemy import select

    from storage.db import make_engine, make_session_factory, session_scope
    from storage.models import Artifact

    engine = make_engine(pg_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return list(session.scalars(select(Artifact.params).where(Artifact.job_id == job_id)))
    finally:
        engine.dispose()


@pytest.mark.integration
@pytest.mark.slow
def test_out_of_memory_retries_smaller_and_the_worker_keeps_serving(
    farm_factory, tiny_models, pg_url, redis_url, tmp_path, fault_table
) -> None:
    rows = {
        name: fault_table.row("Resource faults", fault, injected, expected)
        for name, fault, injected, expected in (
            (
                "video",
                "out of memory decoding video frames",
                "VAE raises torch.OutOfMemoryError above two 64x64 frames per decode call; decode_chunk_size 4",
                "retryable; the next attempt decodes fewer frames at once; the job succeeds",
            ),
            (
                "image",
                "out of memory decoding an image",
                "VAE raises torch.OutOfMemoryError when decoding untiled",
                "retryable; the next attempt decodes in tiles; the resident pipeline is untiled again afterwards",
            ),
            (
                "floor",
                "out of memory with nothing left to lower",
                "a 128x128 video: even one frame is over the budget",
                "each attempt at smaller settings (4, 2, 1 frames), then failed for good, not retried identically",
            ),
        )
    }
    image = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (90, 160, 60)).save(image)
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    farm.start_worker(["farm.control"], name="control")
    worker = farm.start_worker(
        ["farm.gpu.svd", "farm.gpu.sd15"],
        name="oom",
        PYTHONPATH=f"{FAULTS}:{ROOT}",
        FARM_TEST_OOM_CELLS=str(_budget(tiny_models["svd"])),
    )
    with farm.client() as client:
        video = client.submit(_video_job(tiny_models["svd"], image))
        pictures = [client.submit(text_job(tiny_models["sd15"], prompts=["a"], count=1)) for _ in range(2)]
        floor = client.submit(_video_job(tiny_models["svd"], image, width=128, height=128))
        done = {job: client.wait(job, timeout=300) for job in (video, *pictures, floor)}

        (shard,) = done[video]["shards"]
        assert done[video]["status"] == "succeeded" and shard["attempts"] == 2, shard
        assert "out of memory" in shard["errors"][0] and "decodes 2 frames at a time (was 4)" in shard["errors"][0]
        assert all(p["memory"] == {"decode_chunk_size": 2} for p in _params(pg_url, video))
        rows["video"].observed = f"{shard['errors'][0][:160]}; attempt 2 succeeded with decode_chunk_size 2"

        for job in pictures:  # the second job OOMs again: tiling was not left on the resident pipeline
            (shard,) = done[job]["shards"]
            assert done[job]["status"] == "succeeded" and shard["attempts"] == 2, shard
            assert "decodes the image in tiles" in shard["errors"][0]
            (key,) = [r["key"] for r in client.results(job)]
            png = Image.open(io.BytesIO(client.store.get_bytes(key)))
            assert json.loads(png.text["farm"])["memory"] == {"vae_tiling": True}
        rows["image"].observed = (
            f"{shard['errors'][0][:140]}; attempt 2 succeeded tiled (recorded in the PNG's parameters); "
            "the next job's first attempt ran untiled again (and ran out again): nothing leaked"
        )

        (shard,) = done[floor]["shards"]
        assert done[floor]["status"] == "failed" and shard["attempts"] == 3, shard
        errors = " | ".join(shard["errors"])
        for change in ("(was 4)", "(was 2)", "already decoding one frame at a time"):
            assert change in errors, errors
        rows["floor"].observed = f"3 attempts at 4, 2, 1 frames; final error: {shard['error'][:160]}"
    assert worker.proc.poll() is None, "the worker keeps serving"


def test_limits_only_ever_go_down() -> None:
    from farm.specs import parse_spec

    video = parse_spec(_video_job(Path("/m"), Path("i.png")) | {"images": [{"key": "inputs/sha256/a.png"}]})
    limits: dict = {}
    chunks = []
    while True:
        limits, _ = lower_limits(video, limits)
        if limits is None:
            break
        chunks.append(limits["decode_chunk_size"])
    assert chunks == [2, 1]
    picture = parse_spec(text_job(Path("/m")))
    tiled, change = lower_limits(picture, {})
    assert tiled == {"vae_tiling": True} and "tiles" in change
    assert lower_limits(picture, tiled)[0] is None
