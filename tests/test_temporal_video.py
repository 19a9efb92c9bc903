"""temporal_video jobs: the spec, sharding and keys, input images, and whole jobs through real
workers (embedded, and on Redis + Postgres + SeaweedFS)."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from farm.inputs import INPUTS_PREFIX, ImageRef, InputImageError, load_image, upload_inputs
from farm.kinds.temporal_video import TemporalVideoSpec
from farm.sharding import plan_shards
from farm.specs import SpecError, parse_spec
from farm.worker.kinds.temporal_video import frame_key, preview_key, segment_seed
from storage.objects.local import LocalStore

REF = {"key": "inputs/sha256/" + "a" * 64 + ".png"}


def video(**overrides: Any) -> dict[str, Any]:
    spec = {"kind": "temporal_video", "model": "/models/svd", "family": "svd", "images": [REF], "seeds": [1, 2]}
    spec.update(overrides)
    return spec


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return dict(info.value.problems)


# -- spec ----------------------------------------------------------------------------------------
def test_defaults_and_round_trip() -> None:
    spec = parse_spec(video())
    assert isinstance(spec, TemporalVideoSpec)
    assert (spec.num_frames, spec.segments, spec.fps, spec.motion_bucket_id) == (14, 1, 7, 127)
    assert (spec.shard_size, spec.steps, spec.width, spec.height) == (1, 25, 1024, 576)
    assert spec.item_axes() == {"images": 1, "seeds": 2}
    assert parse_spec(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"family": "sd15"}, "family", "temporal_video jobs run on svd models, not sd15"),
        ({"images": []}, "images", "at least 1 item"),
        ({"images": [{"key": "../etc/passwd"}]}, "images[0].key", "not allowed"),
        ({"images": [{"path": "./a.png"}]}, "images[0].path", "unknown field"),
        ({"images": [{"key": "a.png", "sha256": "xyz"}]}, "images[0].sha256", "64 lowercase hex"),
        ({"prompts": ["a cat"]}, "prompts", "conditioned on images, not prompts"),
        ({"scheduler": "ddim"}, "scheduler", "use 'euler'"),
        ({"num_frames": 1}, "num_frames", "greater than or equal to 2"),
        ({"segments": 33}, "segments", "less than or equal to 32"),
        ({"fps": 0}, "fps", "greater than or equal to 1"),
        ({"motion_bucket_id": 1024}, "motion_bucket_id", "less than or equal to 1023"),
        ({"noise_aug_strength": 1.5}, "noise_aug_strength", "less than or equal to 1"),
        ({"min_guidance": 4.0, "guidance": 3.0}, "min_guidance", "must not exceed guidance"),
        ({"patches": [{"type": "clip_attention_multiply", "q": 2.0}]}, "patches[0].type", "sd15 or sdxl models"),
        (
            {"patches": [{"type": "unet_temporal_attention_multiply", "self_temporal": 11}]},
            "patches[0].self_temporal",
            "less than or equal to 10",
        ),
        ({"seeds": list(range(50)), "images": [REF] * 64, "segments": 32}, "spec", "frames in all"),
    ],
)
def test_invalid_video_specs_name_the_field(overrides: dict, field: str, reason: str) -> None:
    found = problems(video(**overrides))
    assert field in found, found
    assert reason in found[field]


def test_temporal_multiplier_patch_is_accepted() -> None:
    spec = parse_spec(video(patches=[{"type": "unet_temporal_attention_multiply", "self_temporal": 1.5}]))
    (patch,) = spec.patches
    built = patch.to_patch()
    assert type(built).__name__ == "UNetTemporalAttentionMultiply" and built.self_temporal == 1.5


def test_one_clip_per_shard_image_major_with_stable_keys() -> None:
    spec = parse_spec(video(images=[REF, {"key": "inputs/b.png"}], seeds=[7, 9], segments=3))
    job = uuid.UUID(int=5)
    shards = plan_shards(spec, job)
    assert [(s.items[0].extra, s.items[0].seed) for s in shards] == [
        ((("image_index", 0),), 7),
        ((("image_index", 0),), 9),
        ((("image_index", 1),), 7),
        ((("image_index", 1),), 9),
    ]
    assert {s.queue for s in shards} == {"farm.gpu.svd"}
    item = shards[3].to_params()["items"][0]
    assert item["key"] == f"renders/{job}/00003/000003-s9.mp4"
    assert frame_key(spec, job, 3, item, 41) == f"renders/{job}/00003/000003-s9-f00041.png"
    assert preview_key(spec, job, 3, item) == f"renders/{job}/00003/000003-s9.gif"


def test_segment_seeds_are_deterministic_and_distinct() -> None:
    assert segment_seed(42, 0) == 42
    seeds = [segment_seed(s, k) for s in range(5) for k in range(4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert segment_seed(42, 3) == segment_seed(42, 3)


# -- input images ----------------------------------------------------------------------------------
def _png(color: tuple[int, int, int] = (200, 80, 40), size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_local_images_are_uploaded_content_addressed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    (tmp_path / "a.png").write_bytes(_png())
    data = video(images=[{"path": "a.png"}, {"path": str(tmp_path / "a.png")}])
    out = upload_inputs(data, store, tmp_path)
    first, second = out["images"]
    assert (first["key"], first["sha256"]) == (second["key"], second["sha256"])  # one object for one content
    assert first["key"].startswith(INPUTS_PREFIX + "/") and first["key"].endswith(".png")
    assert (first["name"], second["name"]) == ("a.png", str(tmp_path / "a.png"))  # as the spec gave them
    spec = parse_spec(out)
    image = load_image(store, spec.images[0], "images[0]")
    assert image.size == (64, 64) and image.getpixel((0, 0)) == (200, 80, 40)
    assert out["seeds"] == [1, 2] and data["images"][0] == {"path": "a.png"}  # the input is not modified


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"definitely not an image", "not an image"),
        (_png()[:60], "unreadable image"),
        (None, "does not exist"),
    ],
)
def test_bad_local_images_are_refused_before_anything_is_stored(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    store = LocalStore(tmp_path / "store")
    if content is not None:
        (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(InputImageError, match=reason) as info:
        upload_inputs(video(images=[{"path": "bad.png"}]), store, tmp_path)
    assert "spec.images[0]" in str(info.value)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.png"))


def test_worker_side_image_errors_are_user_errors(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("inputs/text.png", b"hello")
    with pytest.raises(InputImageError, match=r"images\[1\] \(inputs/text.png\): not an image"):
        load_image(store, ImageRef(key="inputs/text.png"), "images[1]")
    with pytest.raises(InputImageError, match="not in the object store"):
        load_image(store, ImageRef(key="inputs/missing.png"), "images[0]")
    store.put_bytes("inputs/ok.png", _png())
    with pytest.raises(InputImageError, match="does not match its sha256"):
        load_image(store, ImageRef(key="inputs/ok.png", sha256="0" * 64), "images[0]")
    assert isinstance(InputImageError("x"), ValueError)


# -- whole jobs through real workers ---------------------------------------------------------------
VIDEO_QUEUES = ["farm.control", "farm.gpu.svd"]


def tiny_video_job(model: Path, image: Path, **overrides: Any) -> dict[str, Any]:
    spec = {
        "kind": "temporal_video",
        "model": str(model),
        "family": "svd",
        "images": [{"path": str(image)}],
        "seeds": [5, 6],
        "num_frames": 3,
        "segments": 2,
        "steps": 2,
        "width": 64,
        "height": 64,
        "fps": 6,
        "decode_chunk_size": 2,
        "output_prefix": "videos",
        "patches": [{"type": "unet_temporal_attention_multiply", "self_temporal": 1.2, "cross_temporal": 0.8}],
    }
    spec.update(overrides)
    return spec


def _check_video_job(farm: Any, job_id: uuid.UUID) -> None:
    from farm.media import probe_video

    with farm.client() as client:
        summary = client.wait(job_id, timeout=300)
        assert summary["status"] == "succeeded", summary
        assert (summary["items_done"], summary["shards_done"]) == (2, 2)
        results = client.results(job_id)
        by_type: dict[str, list[dict]] = {}
        for r in results:
            by_type.setdefault(r["content_type"], []).append(r)
        assert len(by_type["video/mp4"]) == 2 and len(by_type["image/gif"]) == 2
        assert len(by_type["image/png"]) == 2 * 2 * 3  # seeds x segments x frames
        for mp4 in by_type["video/mp4"]:
            info = probe_video(client.store.get_bytes(mp4["key"]))
            assert (info.frames, info.width, info.height) == (6, 64, 64)
            assert info.fps == pytest.approx(6, abs=0.01)
            stem = mp4["key"].removesuffix(".mp4")
            frames = sorted(r["key"] for r in by_type["image/png"] if r["key"].startswith(stem + "-f"))
            assert frames == [f"{stem}-f{n:05d}.png" for n in range(6)]
        gif = Image.open(io.BytesIO(client.store.get_bytes(by_type["image/gif"][0]["key"])))
        assert gif.n_frames >= 2
        deadline = time.monotonic() + 30
        while not client.store.exists(f"videos/{job_id}/manifest.json") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.store.exists(f"videos/{job_id}/contact_sheet.png")
        previews = client.previews(job_id)  # what `farm status JOB` shows a person
        assert previews["contact_sheet"] and previews["manifest"]
        assert len(previews["gif_previews"]) == 2 and all(".gif" in url for url in previews["gif_previews"])
        for shard in summary["shards"]:
            assert {"load_s", "patch_s", "denoise_s", "encode_s", "upload_s"} <= shard["timings"].keys()


def test_two_segment_two_seed_video_job_end_to_end(farm_factory, tiny_models, tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    image.write_bytes(_png())
    farm = farm_factory()
    farm.start_worker(VIDEO_QUEUES)
    with farm.client() as client:
        job_id = client.submit(tiny_video_job(tiny_models["svd"], image))
    _check_video_job(farm, job_id)

    # A clip whose conditioning image is not an image fails alone; the worker keeps serving.
    with farm.client() as client:
        client.store.put_bytes("inputs/broken.png", b"not a png")
        spec = tiny_video_job(tiny_models["svd"], image, seeds=[5], segments=1)
        spec["images"] = [spec["images"][0], {"key": "inputs/broken.png"}]
        partial = client.submit(spec)
        summary = client.wait(partial, timeout=300)
    assert summary["status"] == "partial", summary
    failed = [s for s in summary["shards"] if s["status"] == "failed"]
    assert len(failed) == 1 and "images[1] (inputs/broken.png): not an image" in failed[0]["error"]
    assert failed[0]["attempts"] == 1  # a user error is not retried


@pytest.mark.integration
def test_video_job_on_real_services(farm_factory, tiny_models, pg_url, redis_url, seaweedfs, tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    image.write_bytes(_png((30, 120, 220)))
    farm = farm_factory(broker=redis_url, db_url=pg_url, s3=seaweedfs)
    farm.start_worker(VIDEO_QUEUES)
    farm.start_worker(["farm.gpu.svd"])
    with farm.client() as client:
        job_id = client.submit(tiny_video_job(tiny_models["svd"], image, idempotency_key=f"video-{time.time_ns()}"))
    _check_video_job(farm, job_id)


# -- resume after a failure in the middle of a clip -------------------------------------------------
class FailingPuts:
    """The real store, with the n-th upload failing with a retryable store error that is not an
    outage (an outage is waited out inside the attempt: see tests/test_outages.py)."""

    def __init__(self, store: Any, fail_at: int) -> None:
        self.store, self.fail_at, self.puts = store, fail_at, 0

    def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> Any:
        from farm.errors import StorageError

        self.puts += 1
        if self.puts == self.fail_at:
            raise StorageError("injected: the store refused the write", retryable=True)
        return self.store.put_bytes(key, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_clip_resumes_from_its_stored_segments(tiny_models, tmp_path: Path) -> None:
    from sqlalchemy import select

    from farm.scheduler import schedule_job, submit_job
    from farm.settings import FarmSettings
    from farm.worker.resources import WorkerResources
    from farm.worker.runtime import execute_shard
    from storage import migrate
    from storage.db import session_scope
    from storage.models import Artifact

    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data", worker={"device": "cpu"})
    migrate.upgrade(settings.database_url)
    res = WorkerResources.create(settings, name="resume-test")
    image = tmp_path / "start.png"
    image.write_bytes(_png((90, 160, 60)))
    ref = upload_inputs({"path": str(image)}, res.store, tmp_path)

    def run_job(prefix: str, store: Any) -> tuple[list[str], dict[str, Any]]:
        spec = parse_spec(
            {**tiny_video_job(tiny_models["svd"], image, seeds=[21]), "images": [ref], "output_prefix": prefix}
        )
        with session_scope(res.session_factory) as session:
            job, _ = submit_job(session, spec)
            (dispatch,) = schedule_job(session, job.id)
        outcomes = []
        real_store, res.store = res.store, store
        try:
            outcomes.append(execute_shard(res, dispatch.shard_id).status)
        finally:
            res.store = real_store
        if outcomes[-1] == "retry":
            outcomes.append(execute_shard(res, dispatch.shard_id).status)
        with session_scope(res.session_factory) as session:
            rows = session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.key)).all()
            artifacts = {r.key.rsplit("/", 1)[1]: (r.sha256, r.fencing_token) for r in rows}
        return outcomes, artifacts

    clean_outcomes, clean = run_job("clean", res.store)
    assert clean_outcomes == ["succeeded"]
    resumed_outcomes, resumed = run_job("resumed", FailingPuts(res.store, fail_at=4))  # segment 1's first frame
    assert resumed_outcomes == ["retry", "succeeded"]
    assert resumed.keys() == clean.keys() and len(resumed) == 6 + 2  # frames, mp4, gif
    frames = sorted(k for k in clean if k.endswith(".png"))
    # Every frame is the frame an uninterrupted run makes (same segment seeds, same conditioning).
    assert [resumed[k][0] for k in frames] == [clean[k][0] for k in frames]
    # Segment 0 was written by the first attempt and read back, not rendered again.
    first_tokens = {resumed[k][1] for k in frames[:3]}
    later_tokens = {resumed[k][1] for k in frames[3:]} | {resumed[k][1] for k in resumed if not k.endswith(".png")}
    assert len(first_tokens) == 1 and len(later_tokens) == 1 and first_tokens != later_tokens
    res.close()
