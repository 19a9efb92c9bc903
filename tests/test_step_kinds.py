"""Post-steps on the CPU queue (issue 28): the ``encode``, ``upscale``, ``contact_sheet`` and
``package`` kinds, their specs, and whole steps through real worker processes: a tiny SVD job
rendered on its GPU queue's worker, then its steps on a ``farm worker --queues farm.cpu`` that
never loads a model."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from farm.job_spec import SpecError
from farm.kinds.encode import EncodeSpec
from farm.kinds.step import StepSpec
from farm.media import FfmpegFailed, probe_video, stream_mp4
from farm.sharding import plan_shards
from farm.specs import parse_spec
from farm.steps import post_step_specs, resolve_step
from storage.db import session_scope
from storage.identity import create_user, ensure_default_identity
from storage.models import Artifact, Job, Shard
from tests.test_temporal_video import VIDEO_QUEUES, _png, tiny_video_job

SOURCE = str(uuid.UUID(int=7))
ROOT = Path(__file__).resolve().parents[1]


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return dict(info.value.problems)


# -- specs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["encode", "upscale", "contact_sheet", "package"])
def test_steps_need_no_model_and_go_to_the_cpu_queue(kind: str) -> None:
    spec = parse_spec({"kind": kind, "source_job": SOURCE})
    assert isinstance(spec, StepSpec) and (spec.model, spec.family) == ("", "cpu")
    assert parse_spec(spec.model_dump(mode="json")) == spec  # the stored spec parses again on the worker
    shards = plan_shards(spec, uuid.uuid4())
    assert [shard.queue for shard in shards] == ["farm.cpu"]
    assert shards[0].items[0].key.endswith("/00000/000000-s0.json")


def test_encode_defaults_and_upscale_parts_shard() -> None:
    spec = parse_spec({"kind": "encode", "source_job": SOURCE})
    assert isinstance(spec, EncodeSpec) and (spec.fps, spec.crf) == (8, 18)
    upscale = parse_spec({"kind": "upscale", "source_job": SOURCE, "scale": 3, "parts": 3})
    assert upscale.item_count() == 3
    assert [s.index for s in plan_shards(upscale, uuid.uuid4())] == [0, 1, 2]


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"source_job": "not-a-job"}, "source_job", "valid UUID"),
        ({"source_job": None}, "source_job", ""),
        ({"kind": "upscale", "scale": 5}, "scale", "less than or equal to 4"),
        ({"kind": "upscale", "scale": 1}, "scale", "greater than or equal to 2"),
        ({"kind": "upscale", "max_pixels": 10**9}, "max_pixels", "less than or equal to"),
        ({"crf": 52}, "crf", "less than or equal to 51"),
        ({"fps": 0}, "fps", "greater than or equal to 1"),
        ({"model": "org/model"}, "model", "encode steps render nothing and take no 'model'"),
        ({"family": "svd"}, "family", "take no 'family'"),
        ({"guidance": 3.0}, "guidance", "take no 'guidance'"),
        ({"prompts": ["a cat"]}, "prompts", "take no 'prompts'"),
        ({"kind": "package", "format": "zip"}, "format", "webdataset"),
    ],
)
def test_bad_step_specs_name_the_field(overrides: dict[str, Any], field: str, reason: str) -> None:
    found = problems({"kind": "encode", "source_job": SOURCE, **overrides})
    assert field in found, found
    assert reason in found[field]


@pytest.mark.parametrize(
    ("step", "field", "reason"),
    [
        ({"kind": "text_to_image"}, "post_steps[0].kind", "must be a step kind"),
        ({"kind": "encode", "fps": 0}, "post_steps[0].fps", "greater than"),
        ({"kind": "encode", "source_job": SOURCE}, "post_steps[0].source_job", "set by the farm"),
        ({"kind": "upscale", "after": ["x"]}, "post_steps[0].after", "set by the farm"),
    ],
)
def test_bad_post_steps_name_the_field(step: dict[str, Any], field: str, reason: str) -> None:
    spec = {"model": "org/model", "family": "sd15", "prompts": ["p"], "seeds": [1], "post_steps": [step]}
    found = problems(spec)
    assert field in found and reason in found[field], found


def test_post_steps_become_step_specs_after_their_job() -> None:
    spec = parse_spec(
        {"model": "org/m", "family": "sd15", "prompts": ["p"], "seeds": [1], "post_steps": [{"kind": "contact_sheet"}]}
    )
    job = uuid.uuid4()
    (step,) = post_step_specs(spec, job)
    assert (step.kind, step.source_job, step.after, step.after_policy) == ("contact_sheet", job, [str(job)], "wait")


def test_ffmpeg_failure_is_reported_with_its_exit_code_and_stderr() -> None:
    frames = [Image.new("RGB", (20000, 2))]  # libx264 refuses a frame this wide
    with pytest.raises(FfmpegFailed, match=r"ffmpeg exited with code \d+: .*(width|height|encoder)"):
        stream_mp4(iter(frames), (20000, 2), 5)
    with pytest.raises(ValueError, match="frame 1 is 8x8, expected 10x10"):
        stream_mp4(iter([Image.new("RGB", (10, 10)), Image.new("RGB", (8, 8))]), (10, 10), 5)


def test_a_step_of_a_job_out_of_scope_is_refused_like_an_unknown_one(tmp_path: Path) -> None:
    from storage import migrate
    from storage.db import make_engine, make_session_factory

    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate.upgrade(url)
    sessions = make_session_factory(make_engine(url))
    with session_scope(sessions) as session:
        admin, default = ensure_default_identity(session)
        source = Job(
            kind="text_to_image", family="sd15", spec={}, spec_hash="x", output_prefix="renders/team",
            owner_id=admin.id, project_id=default.id,
        )  # fmt: skip
        session.add(source)
        outsider = create_user(session, "outsider", "member", project="elsewhere")
        session.flush()
        spec = parse_spec({"kind": "encode", "source_job": str(source.id)})
        resolved = resolve_step(session, spec, admin.id)
        assert resolved.output_prefix == f"renders/team/{source.id}/steps"
        for who in (outsider.id, admin.id):
            unknown = parse_spec({"kind": "encode", "source_job": str(uuid.uuid4())})
            with pytest.raises(SpecError) as info:
                resolve_step(session, unknown if who == admin.id else spec, who)
            assert [field for field, _ in info.value.problems] == ["source_job"]
            assert "no job" in info.value.problems[0][1]
        elsewhere = parse_spec({"kind": "encode", "source_job": str(source.id), "output_prefix": "mine"})
        with pytest.raises(SpecError, match="output_prefix: a step's outputs go beside its source job's"):
            resolve_step(session, elsewhere, admin.id)


def test_a_cpu_worker_runs_the_steps_without_torch() -> None:
    """The control image (no torch) runs `farm worker --queues farm.cpu`: everything a step's
    delivery imports loads with torch and diffusers missing."""
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'insightface'): sys.modules[name] = None\n"
        "import farm.cli, tasks.shards, farm.worker.runtime, farm.worker.heartbeat\n"
        "from farm.kinds import job_kind\n"
        "for kind in ('encode', 'upscale', 'contact_sheet', 'package'): job_kind(kind).runner()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# -- whole steps through real workers -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _artifacts(client: Any, job_id: uuid.UUID) -> list[Artifact]:
    with session_scope(client.sessions) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.key)).all()
        session.expunge_all()
        return list(rows)


def _run_step(client: Any, spec: dict[str, Any], status: str = "succeeded") -> tuple[uuid.UUID, dict[str, Any]]:
    job_id = client.submit(spec)
    summary = client.wait(job_id, timeout=180)
    assert summary["status"] == status, summary
    return job_id, summary


def _check_lineage(client: Any, output: Artifact, sources: dict[str, str]) -> None:
    """Every input an output names is an output of the source, with the sha256 the source recorded."""
    inputs = output.params["inputs"]
    assert inputs, output.params
    for entry in inputs:
        assert sources[entry["key"]] == entry["sha256"]
    assert hashlib.sha256(client.store.get_bytes(output.key)).hexdigest() == output.sha256


def test_svd_job_then_its_steps_on_a_cpu_worker(farm_factory, tiny_models, tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    image.write_bytes(_png())
    farm = farm_factory()
    farm.start_worker(VIDEO_QUEUES)
    metrics_port = _free_port()
    cpu = farm.start_worker(["farm.cpu"], name="cpu-steps", FARM_WORKER__METRICS_PORT=str(metrics_port))
    with farm.client() as client:
        # 2 clips x 6 frames, 64x64, with an encode post-step: a job of its own, after the source
        video = {**tiny_video_job(tiny_models["svd"], image), "post_steps": [{"kind": "encode", "fps": 12, "crf": 20}]}
        source = client.submit(video)
        (then,) = client.get(source)["then"]
        assert (then["kind"], then["mode"], then["policy"]) == ("encode", "job", "wait")
        encode = uuid.UUID(then["id"])
        ended = client.wait(source, timeout=300)
        assert ended["status"] == "succeeded"
        summary = client.wait(encode, timeout=180)
        assert summary["status"] == "succeeded", summary
        assert client.get(encode)["after"][0]["id"] == str(source)
        with session_scope(client.sessions) as session:
            source_end = session.scalar(select(Job.finished_at).where(Job.id == source))
            step_start = session.scalar(select(func.min(Shard.started_at)).where(Shard.job_id == encode))
        assert step_start >= source_end, "the step's shard started only once its source had ended"
        source_rows = _artifacts(client, source)
        shas = {a.key: a.sha256 for a in source_rows}
        frames = [a for a in source_rows if a.content_type == "image/png"]
        assert len(frames) == 12

        # encode: one mp4 per clip, every frame, at the fps asked for, beside the source's outputs
        steps_folder = f"videos/{source}/steps/{encode}/00000"
        mp4s = [a for a in _artifacts(client, encode) if a.content_type == "video/mp4"]
        assert sorted(a.key for a in mp4s) == [f"{steps_folder}/000000-s5.mp4", f"{steps_folder}/000001-s6.mp4"]
        for mp4 in mp4s:
            info = probe_video(client.store.get_bytes(mp4.key))
            assert (info.frames, info.width, info.height, info.codec) == (6, 64, 64, "h264")
            assert info.fps == pytest.approx(12, abs=0.01)
            _check_lineage(client, mp4, shas)
            assert len(mp4.params["inputs"]) == 6 and mp4.params["fps"] == 12
        record = json.loads(client.store.get_bytes(f"{steps_folder}/000000-s0.json"))
        assert record["source_job"] == str(source) and len(record["outputs"]) == 2 and len(record["inputs"]) == 12
        assert client.store.exists(f"videos/{source}/steps/{encode}/manifest.json")
        assert all("load_s" not in shard["timings"] for shard in summary["shards"])  # no model cache on farm.cpu

        # upscale: every frame twice as large, in two parts (shards)
        upscale, summary = _run_step(client, {"kind": "upscale", "source_job": str(source), "parts": 2})
        assert summary["shards_done"] == 2
        bigger = [a for a in _artifacts(client, upscale) if a.content_type == "image/png"]
        assert len(bigger) == 12
        for output in bigger:
            assert Image.open(io.BytesIO(client.store.get_bytes(output.key))).size == (128, 128)
            assert output.key.startswith(f"videos/{source}/steps/{upscale}/")
            _check_lineage(client, output, shas)

        # contact_sheet: a labelled grid of the source's frames
        sheet_job, _ = _run_step(client, {"kind": "contact_sheet", "source_job": str(source), "title": "clips"})
        (sheet,) = [a for a in _artifacts(client, sheet_job) if a.content_type == "image/png"]
        assert sheet.key == f"videos/{source}/steps/{sheet_job}/00000/contact_sheet.png"
        assert Image.open(io.BytesIO(client.store.get_bytes(sheet.key))).width >= 560
        _check_lineage(client, sheet, shas)

        # package: a WebDataset tar of the source's images, readable with tarfile
        package, _ = _run_step(client, {"kind": "package", "source_job": str(source), "samples_per_file": 8})
        tars = [a for a in _artifacts(client, package) if a.content_type == "application/x-tar"]
        assert [t.key.rsplit("/", 1)[-1] for t in tars] == ["00000.tar", "00001.tar"]
        names: list[str] = []
        for tar in tars:
            with tarfile.open(fileobj=io.BytesIO(client.store.get_bytes(tar.key))) as archive:
                for member in archive.getmembers():
                    names.append(member.name)
                    if member.name.endswith(".png"):
                        data = archive.extractfile(member).read()
                        assert hashlib.sha256(data).hexdigest() in set(shas.values())
        assert sum(name.endswith(".png") for name in names) == 12
        assert sum(name.endswith(".json") for name in names) == 12

        # bad input: a source without images, then a changed frame: the shard fails once with the
        # reason, and the CPU worker goes on to the next step.
        _, failed = _run_step(client, {"kind": "encode", "source_job": str(package)}, "failed")
        (shard,) = failed["shards"]
        assert "has no images" in shard["error"] and shard["attempts"] == 1
        client.store.put_bytes(frames[3].key, _png((200, 10, 10)))
        _, failed = _run_step(client, {"kind": "encode", "source_job": str(source)}, "failed")
        (shard,) = failed["shards"]
        assert frames[3].key in shard["error"] and "differ from the sha256" in shard["error"]
        assert shard["attempts"] == 1
        # A step of a step: the upscaled frames (unchanged) on a sheet; the worker still serves.
        sheet_of_step, _ = _run_step(client, {"kind": "contact_sheet", "source_job": str(upscale)})
        assert _artifacts(client, sheet_of_step)[0].key.startswith(f"videos/{source}/steps/{upscale}/steps/")

        # spec errors at submit name the field
        with pytest.raises(SpecError) as info:
            client.submit({"kind": "upscale", "source_job": str(uuid.uuid4())})
        assert [field for field, _ in info.value.problems] == ["source_job"]
        with pytest.raises(SpecError) as info:
            client.submit({"kind": "upscale", "source_job": str(source), "scale": 8})
        assert [field for field, _ in info.value.problems] == ["scale"]

        with session_scope(client.sessions) as session:
            step_queues = set(
                session.scalars(select(Shard.queue).join(Job, Job.id == Shard.job_id).where(Job.family == "cpu"))
            )
        assert step_queues == {"farm.cpu"}
        (row,) = [w for w in client.workers() if w["name"] == cpu.name]
        assert row["device"] == "cpu" and row["pinned_models"] == []

    # The CPU worker served every step and never loaded a pipeline.
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    served = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("farm_shards_total{") and 'queue="farm.cpu"' in line and 'outcome="succeeded"' in line
    ]
    assert served and served[0] >= 6, text[:2000]
    assert not [line for line in text.splitlines() if line.startswith("farm_model_loads_total")]
    assert not [line for line in text.splitlines() if line.startswith("farm_model_cache_hits_total")]
