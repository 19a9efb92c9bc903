"""``upscale`` with ``method: img2img`` (a hires fix): the spec and its submit checks, the refine
against bare diffusers, and a whole post-step through a real GPU-queue worker that reuses the
source job's resident model."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from farm.job_spec import SpecError
from farm.kinds import job_kind
from farm.kinds.upscale import UpscaleSpec
from farm.sharding import plan_shards
from farm.specs import parse_spec, spec_fingerprint
from farm.steps import resolve_step
from storage.db import session_scope
from storage.identity import ensure_default_identity
from storage.models import Job, Shard
from tests.fixtures.farm import text_job
from tests.test_step_kinds import _artifacts, _check_lineage

SOURCE = str(uuid.UUID(int=7))
PIPELINES = {"sd15": "StableDiffusionImg2ImgPipeline", "sdxl": "StableDiffusionXLImg2ImgPipeline"}


def _problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec({"kind": "upscale", "source_job": SOURCE, **data})
    return dict(info.value.problems)


# -- the spec ------------------------------------------------------------------------------------------
def test_img2img_spec_states_its_defaults_and_parses_again() -> None:
    spec = parse_spec({"kind": "upscale", "source_job": SOURCE, "method": "img2img", "strength": 1})
    assert isinstance(spec, UpscaleSpec) and spec.runs_model()
    assert (spec.strength, spec.refine_steps, spec.refine_guidance, spec.seed, spec.prompt) == (1.0, 20, 5.0, 0, None)
    resolved = spec.model_copy(update={"model": "/models/tiny", "family": "sd15"})  # as resolve_step sets them
    stored = resolved.model_dump(mode="json")
    assert parse_spec(stored) == resolved  # the worker and a re-run parse the stored spec again
    assert [s.queue for s in plan_shards(resolved, uuid.uuid4())] == ["farm.gpu.sd15"]
    assert job_kind("upscale").model_of(resolved) == ("/models/tiny", "sd15")
    lanczos = parse_spec({"kind": "upscale", "source_job": SOURCE})
    assert (lanczos.method, lanczos.strength, job_kind("upscale").model_of(lanczos)) == ("lanczos", None, None)
    assert parse_spec(lanczos.model_dump(mode="json")) == lanczos
    # a Lanczos spec stored before `method` existed fingerprints as it did
    old = {k: v for k, v in lanczos.model_dump(mode="json").items() if k not in ("method", *IMG2IMG_ONLY)}
    assert spec_fingerprint(parse_spec(old)) == spec_fingerprint(lanczos)


IMG2IMG_ONLY = ("strength", "refine_steps", "refine_guidance", "prompt", "seed")


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"strength": 0.5}, "strength", "'strength' is a setting of method img2img"),
        ({"refine_steps": 10}, "refine_steps", "setting of method img2img"),
        ({"prompt": "a cat"}, "prompt", "setting of method img2img"),
        ({"seed": 3}, "seed", "setting of method img2img"),
        ({"model": "org/model"}, "model", "method lanczos loads no model and takes no 'model'"),
        ({"family": "sd15"}, "family", "takes no 'family'"),
        ({"method": "img2img", "strength": 0}, "strength", "greater than 0"),
        ({"method": "img2img", "strength": 1.5}, "strength", "less than or equal to 1"),
        ({"method": "img2img", "refine_steps": 3, "strength": 0.3}, "refine_steps", "under one denoising step"),
        ({"method": "img2img", "family": "svd"}, "family", "'cpu', 'sd15' or 'sdxl'"),
        ({"method": "img2img", "steps": 10}, "steps", "take no 'steps'"),
        ({"method": "upscaler"}, "method", "'lanczos' or 'img2img'"),
    ],
)
def test_bad_upscale_settings_name_the_field(data: dict[str, Any], field: str, reason: str) -> None:
    found = _problems(data)
    assert field in found and reason in found[field], found


def test_submit_gives_img2img_its_source_model_and_refuses_sources_without_one(tmp_path: Path, tiny_models) -> None:
    from storage import migrate
    from storage.db import make_engine, make_session_factory

    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate.upgrade(url)
    sessions = make_session_factory(make_engine(url))
    sd15, sdxl = str(tiny_models["sd15"]), str(tiny_models["sdxl"])
    with session_scope(sessions) as session:
        admin, default = ensure_default_identity(session)

        def job(kind: str, family: str, spec: dict[str, Any]) -> str:
            row = Job(
                kind=kind, family=family, spec=spec, spec_hash="x", output_prefix="renders",
                owner_id=admin.id, project_id=default.id,
            )  # fmt: skip
            session.add(row)
            session.flush()
            return str(row.id)

        render = job("text_to_image", "sd15", {"kind": "text_to_image", "model": sd15, "family": "sd15"})
        video = job("temporal_video", "svd", {"kind": "temporal_video", "model": "/m/svd", "family": "svd"})
        step = job("upscale", "cpu", {"kind": "upscale", "source_job": render, "family": "cpu"})

        def resolve(**given: Any) -> UpscaleSpec:
            spec = parse_spec({"kind": "upscale", "method": "img2img", **given})
            return resolve_step(session, spec, admin.id)

        resolved = resolve(source_job=render)
        assert (resolved.model, resolved.family) == (sd15, "sd15")
        assert plan_shards(resolved, uuid.uuid4())[0].queue == "farm.gpu.sd15"
        assert parse_spec(resolved.model_dump(mode="json")) == resolved
        assert resolve_step(session, parse_spec(resolved.model_dump(mode="json")), admin.id) == resolved  # a re-run
        assert resolve(source_job=render, family="sd15").family == "sd15"
        for source, field, reason in [
            (video, "method", "is svd (it has no img2img pipeline)"),
            (step, "method", "is a step (upscale), with none"),
        ]:
            with pytest.raises(SpecError) as info:
                resolve(source_job=source)
            assert dict(info.value.problems)[field].endswith(reason), info.value.problems
        with pytest.raises(SpecError) as info:
            resolve(source_job=render, model=sdxl)
        assert dict(info.value.problems) == {
            "model": f"{sdxl} is a sdxl model; it must be of the source job's family (sd15)"
        }
        with pytest.raises(SpecError) as info:
            resolve(source_job=render, family="sdxl")
        assert list(dict(info.value.problems)) == ["family"]
        lanczos = resolve_step(session, parse_spec({"kind": "upscale", "source_job": render}), admin.id)
        assert (lanczos.model, lanczos.family, plan_shards(lanczos, uuid.uuid4())[0].queue) == ("", "cpu", "farm.cpu")


# -- the refine against bare diffusers -------------------------------------------------------------------
def bare_img2img(folder: Path, family: str, image: Image.Image, seed: int) -> Image.Image:
    """The independent reference: diffusers' own img2img pipeline loaded from the folder, run on
    ``image`` with the refine settings both tests use (prompt "a red cube", strength 0.5, 4 steps,
    guidance 5.0) and a CPU generator seeded with ``seed``."""
    import diffusers
    import torch

    bare = getattr(diffusers, PIPELINES[family]).from_pretrained(str(folder), local_files_only=True)
    assert type(bare.scheduler).__name__ == "EulerDiscreteScheduler"  # "euler", as the refine's request says
    return bare(
        prompt="a red cube",
        image=image,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_refine_matches_bare_diffusers_img2img(family: str, tiny_models) -> None:
    """The worker's refine (img2img built with from_pipe on the cached pipeline) of a Lanczos-enlarged
    image equals diffusers' own img2img pipeline loaded from the folder, same settings and seed."""
    import torch

    from farm.worker.devices import Placement
    from farm.worker.kinds.upscale_img2img import RefineRequest, img2img_pipeline, refine
    from farm.worker.model_cache import ModelCache

    folder = str(tiny_models[family])
    loaded = ModelCache(Placement("cpu", "float32"), 2**34).get(folder, family)
    source = loaded.pipeline(
        prompt="a red cube", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(3)
    ).images[0]
    bigger = source.resize((128, 128), Image.Resampling.LANCZOS)
    request = RefineRequest("a red cube", "", 11, 0.5, 4, 5.0, "euler")
    pipe = img2img_pipeline(loaded, family)
    assert type(pipe).__name__ == PIPELINES[family] and pipe.unet is loaded.pipeline.unet  # no second copy
    ours = np.asarray(refine(pipe, bigger, request), dtype=np.float64) / 255

    reference = bare_img2img(tiny_models[family], family, bigger, seed=11)
    difference = np.abs(ours - np.asarray(reference, dtype=np.float64) / 255).max()
    print(f"{family}: max abs difference from bare diffusers img2img: {difference}")
    assert difference <= 1e-5
    assert np.abs(ours - np.asarray(bigger, dtype=np.float64) / 255).max() > 0.05  # it did refine


# -- a whole post-step through a real GPU-queue worker ----------------------------------------------------
def test_img2img_post_step_runs_on_the_sources_gpu_queue(farm_factory, tiny_models) -> None:
    farm = farm_factory()
    farm.start_worker(["farm.control", "farm.gpu.sd15"])  # no farm.cpu worker
    spec = text_job(
        tiny_models["sd15"],
        prompts=["a red cube"],
        post_steps=[
            {"kind": "upscale", "method": "img2img", "scale": 2, "strength": 0.5, "refine_steps": 4},
            {"kind": "upscale"},  # Lanczos: farm.cpu, which nobody serves here
        ],
    )
    with farm.client() as client:
        source = client.submit(spec)
        refine_id, lanczos_id = (uuid.UUID(then["id"]) for then in client.get(source)["then"])
        assert client.wait(source, timeout=300)["status"] == "succeeded"
        summary = client.wait(refine_id, timeout=300)
        assert summary["status"] == "succeeded", summary
        with session_scope(client.sessions) as session:
            queues = {
                job_id: set(session.scalars(select(Shard.queue).where(Shard.job_id == job_id)))
                for job_id in (refine_id, lanczos_id)
            }
            families = {
                row.id: row.family for row in session.execute(select(Job.id, Job.family).where(Job.id.in_(queues)))
            }
            stored = session.scalar(select(Job.spec).where(Job.id == refine_id))
        assert queues == {refine_id: {"farm.gpu.sd15"}, lanczos_id: {"farm.cpu"}}
        assert families == {refine_id: "sd15", lanczos_id: "cpu"}
        assert (stored["model"], stored["family"]) == (str(tiny_models["sd15"]), "sd15")  # the source's, at submit
        assert [shard["timings"]["model_loaded"] for shard in summary["shards"]] == [0.0]  # the resident model

        sources = {a.key: a for a in _artifacts(client, source) if a.content_type == "image/png"}
        shas = {key: a.sha256 for key, a in sources.items()}
        outputs = [a for a in _artifacts(client, refine_id) if a.content_type == "image/png"]
        assert len(outputs) == len(sources) == 2
        for output in outputs:
            _check_lineage(client, output, shas)
            (given,) = output.params["inputs"]
            assert output.key.rsplit("/", 1)[-1] == given["key"].rsplit("/", 1)[-1]  # the source image's name
            params = output.params
            assert (params["method"], params["strength"], params["refine_steps"], params["seed"]) == (
                "img2img", 0.5, 4, 0
            )  # fmt: skip
            assert params["prompt"] == "a red cube" == sources[given["key"]].params["prompt"]
            refined = Image.open(io.BytesIO(client.store.get_bytes(output.key))).convert("RGB")
            original = Image.open(io.BytesIO(client.store.get_bytes(given["key"]))).convert("RGB")
            assert refined.size == (128, 128) == (params["width"], params["height"])
            lanczos = original.resize((128, 128), Image.Resampling.LANCZOS)
            assert np.abs(np.asarray(refined, dtype=int) - np.asarray(lanczos, dtype=int)).max() > 10
        assert client.get(lanczos_id)["status"] in ("pending", "running")  # waits for a farm.cpu worker

    # What the worker wrote is what bare diffusers makes of the Lanczos image with those settings.
    reference = bare_img2img(tiny_models["sd15"], "sd15", lanczos, seed=0)
    difference = np.abs(np.asarray(refined, dtype=int) - np.asarray(reference, dtype=int)).max()
    print(f"worker output vs bare diffusers img2img: max abs difference {difference} (of 255)")
    assert difference <= 1  # another process, perhaps other CPU threads: a rounding at most


def test_registry_models_of_img2img_steps_are_pinned_at_submit(farm_factory, tiny_models) -> None:
    """The step takes its source's pinned manifest; a registry model it names is pinned like a
    render job's and must be of the source's family."""
    from farm.model_registry import push_model

    farm = farm_factory()  # submits only: no worker needed
    with farm.client() as client:
        sd15 = push_model(client.store, tiny_models["sd15"], "tiny").ref
        push_model(client.store, tiny_models["sdxl"], "tinyxl")
        pinned = f"registry:tiny@sha256:{sd15.digest}"
        spec = text_job("registry:tiny", post_steps=[{"kind": "upscale", "method": "img2img"}])
        source = client.submit(spec)
        (then,) = client.get(source)["then"]
        named = client.submit(
            {"kind": "upscale", "source_job": str(source), "method": "img2img", "model": "registry:tiny@1"}
        )
        with session_scope(client.sessions) as session:
            stored = {
                job_id: session.scalar(select(Job.spec).where(Job.id == job_id))
                for job_id in (source, uuid.UUID(then["id"]), named)
            }
        assert [(s["model"], s["family"]) for s in stored.values()] == [(pinned, "sd15")] * 3
        with pytest.raises(SpecError) as info:
            client.submit(
                {"kind": "upscale", "source_job": str(source), "method": "img2img", "model": "registry:tinyxl"}
            )
        assert [field for field, _ in info.value.problems] == ["model"]
        assert "is a sdxl model, but the job's family is sd15" in info.value.problems[0][1]
