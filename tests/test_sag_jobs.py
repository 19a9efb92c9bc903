"""``sag`` on image and face-identity jobs: spec validation, the worker applying it after the job's
other patches (one set), recorded parameters, and removal when the next job has none."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.specs import SpecError, parse_spec
from tests.fixtures.farm import text_job

BASE = {"model": "a/b", "family": "sd15", "prompts": ["x"], "seeds": [1]}


def test_sag_defaults_and_round_trip() -> None:
    spec = parse_spec({**BASE, "sag": {}})
    assert (spec.sag.scale, spec.sag.blur_sigma) == (0.5, 2.0)
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert parse_spec(BASE).sag is None


@pytest.mark.parametrize(
    ("sag", "field", "reason"),
    [
        ({"scale": 5.5}, "sag.scale", "less than or equal to 5"),
        ({"scale": -2.5}, "sag.scale", "greater than or equal to -2"),
        ({"blur_sigma": 10.5}, "sag.blur_sigma", "less than or equal to 10"),
        ({"blur_sigma": "2"}, "sag.blur_sigma", "valid number"),
        ({"threshold": 1.0}, "sag.threshold", "unknown field"),
    ],
)
def test_invalid_sag_names_the_field(sag: dict, field: str, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, "sag": sag})
    problems = dict(info.value.problems)
    assert field in problems and reason in problems[field], problems


def test_video_jobs_do_not_take_sag() -> None:
    video = {"kind": "temporal_video", "model": "a/b", "family": "svd", "seeds": [1]}
    video["images"] = [{"key": "inputs/a.png", "sha256": "0" * 64}]
    with pytest.raises(SpecError) as info:
        parse_spec({**video, "sag": {}})
    assert "sag" in dict(info.value.problems)


def _mid_processor(worker, model: Path):
    pipe = worker.res.model_cache().get(str(model), "sd15").pipeline
    return type(pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor).__name__


def test_sag_joins_the_jobs_patch_set_and_is_removed_after(tiny_models, in_process_worker) -> None:
    model = tiny_models["sd15"]
    worker = in_process_worker()
    multiply = [{"type": "unet_self_attention_multiply", "q": 1.2}]
    jobs = {
        "plain": text_job(model, patches=multiply, output_prefix="plain"),
        "sag": text_job(model, patches=multiply, output_prefix="sag", sag={"scale": 0.9, "blur_sigma": 1.5}),
        "after": text_job(model, patches=multiply, output_prefix="after"),
    }
    outputs, processors = {}, {}
    for name, job in jobs.items():
        job_id, outcomes = worker.run(job)
        assert set(outcomes) == {"succeeded"}
        outputs[name] = worker.outputs(job_id)
        processors[name] = _mid_processor(worker, model)
    assert processors == {"plain": "AttnProcessor2_0", "sag": "MiddleAttentionRecorder", "after": "AttnProcessor2_0"}
    params = [p for p, _ in outputs["sag"]]
    assert all(p["sag"] == {"scale": 0.9, "blur_sigma": 1.5} for p in params)
    assert "sag" not in outputs["plain"][0][0]
    assert params[0]["patches_fingerprint"] != outputs["plain"][0][0]["patches_fingerprint"]
    assert all(a != b for (_, a), (_, b) in zip(outputs["plain"], outputs["sag"], strict=True))
    assert [img for _, img in outputs["after"]] == [img for _, img in outputs["plain"]]  # exact restore


def test_sag_with_ip_adapter_at_guidance_one(tiny_models, in_process_worker, tmp_path: Path) -> None:
    """No CFG: SAG runs the uncond pass itself, where the IP-Adapter uses its uncond tokens."""
    from farm.tiny_components import build_tiny_ip_adapter
    from tests.test_face_identity import _face, identity_job

    adapter = build_tiny_ip_adapter("sd15", tmp_path / "adapter")
    refs = [_face(tmp_path, "a.png", (180, 120, 90))]
    worker = in_process_worker()
    images = {}
    for name, extra in {"ip": {}, "ip-sag": {"sag": {"scale": 1.0}}}.items():
        job = identity_job(tiny_models["sd15"], adapter, refs, guidance=1.0, output_prefix=name, **extra)
        job_id, outcomes = worker.run(job)
        assert outcomes == ["succeeded", "succeeded"]
        images[name] = worker.outputs(job_id)
    assert all(p["sag"]["scale"] == 1.0 and p["identity"]["method"] == "ip_adapter" for p, _ in images["ip-sag"])
    assert all(a != b for (_, a), (_, b) in zip(images["ip"], images["ip-sag"], strict=True))
