"""face_identity jobs with the IP-Adapter method: spec, sharding, and whole jobs through real
workers on a tiny SD1.5 model with a fabricated IP-Adapter."""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from farm.kinds.face_identity import FaceIdentitySpec
from farm.sharding import plan_shards
from farm.specs import SpecError, parse_spec

REF = {"key": "inputs/sha256/" + "b" * 64 + ".png"}
IDENTITY = {
    "method": "ip_adapter",
    "adapter": "/models/ip.safetensors",
    "image_encoder": "/models/enc",
    "references": [REF],
}


def spec(**overrides: Any) -> dict[str, Any]:
    data = {"kind": "face_identity", "model": "/models/sd15", "family": "sd15", "prompts": ["a portrait"], "seeds": [1]}
    data["identity"] = dict(IDENTITY)
    data.update(overrides)
    return data


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return dict(info.value.problems)


def test_defaults_and_round_trip() -> None:
    parsed = parse_spec(spec())
    assert isinstance(parsed, FaceIdentitySpec)
    ident = parsed.identity
    assert (ident.combine, ident.weight, ident.mode, ident.crop, ident.start, ident.stop) == (
        "average", 0.8, "additive", "center", 0.0, 1.0
    )  # fmt: skip
    assert parse_spec(parsed.model_dump(mode="json")) == parsed


@pytest.mark.parametrize(
    ("identity", "field", "reason"),
    [
        ({"adapter": "models/ip.safetensors"}, "identity.adapter", "must be a local path"),
        ({"adapter": "/models/ip.ckpt"}, "identity.adapter", ".safetensors or .bin file"),
        ({"image_encoder": "org/encoder"}, "identity.image_encoder", "must be a local path"),
        ({"references": []}, "identity.references", "at least 1 item"),
        ({"weight": 7.0}, "identity.weight", "less than or equal to 5"),
        ({"start": 0.8, "stop": 0.3}, "identity.start", "must not be after stop"),
        ({"mode": "joint"}, "identity.mode", "'additive' or 'fooocus'"),
        ({"method": "photomaker"}, "identity.method", "unknown method 'photomaker'; known: instantid, ip_adapter"),
        ({"extra": 1}, "identity.extra", "unknown field"),
    ],
)
def test_invalid_identity_names_the_field(identity: dict, field: str, reason: str) -> None:
    found = problems(spec(identity={**IDENTITY, **identity}))
    assert field in found, found
    assert reason in found[field]


def test_svd_is_refused_and_identity_is_required() -> None:
    assert "temporal_video" not in problems(spec(family="svd"))["family"]
    assert "face_identity jobs run on sd15 or sdxl" in problems(spec(family="svd"))["family"]
    data = spec()
    del data["identity"]
    assert problems(data)["identity"] == "required field is missing"


def test_items_are_frame_major_then_prompt_major() -> None:
    parsed = parse_spec(spec(prompts=["a", "b"], seeds=[3, 4], frames=[REF, REF, REF], shard_size=4))
    assert parsed.item_axes() == {"frames": 3, "prompts": 2, "seeds": 2}
    shards = plan_shards(parsed, uuid.UUID(int=9))
    items = [item for s in shards for item in s.to_params()["items"]]
    assert len(shards) == 3 and len(items) == 12
    assert [(i["frame_index"], i["prompt_index"], i["seed"]) for i in items[:5]] == [
        (0, 0, 3), (0, 0, 4), (0, 1, 3), (0, 1, 4), (1, 0, 3)
    ]  # fmt: skip
    assert "frame_index" not in plan_shards(parse_spec(spec()), uuid.UUID(int=9))[0].to_params()["items"][0]


# -- end to end ----------------------------------------------------------------------------------------
def _face(tmp_path: Path, name: str, colour: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", (96, 96), (230, 220, 200))
    image.paste(Image.new("RGB", (40, 56), colour), (28, 20))
    path = tmp_path / name
    image.save(path)
    return path


def identity_job(model: Path, adapter: Path, refs: list[Path], **overrides: Any) -> dict[str, Any]:
    data = {
        "kind": "face_identity",
        "model": str(model),
        "family": "sd15",
        "prompts": ["a portrait, studio light", "a portrait, outdoors"],
        "seeds": [17],
        "steps": 3,
        "width": 64,
        "height": 64,
        "guidance": 5.0,
        "shard_size": 1,
        "output_prefix": "faces",
        "identity": {
            "method": "ip_adapter",
            "adapter": str(adapter / "ip-adapter.safetensors"),
            "image_encoder": str(adapter / "image_encoder"),
            "references": [{"path": str(p)} for p in refs],
            "weight": 0.9,
        },
    }
    data.update(overrides)
    return data


@pytest.fixture(scope="module")
def sd15_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from farm.tiny_components import build_tiny_ip_adapter

    return build_tiny_ip_adapter("sd15", tmp_path_factory.mktemp("adapter") / "sd15-plain")


def _check(farm: Any, job_id: uuid.UUID, items: int) -> list[dict]:
    with farm.client() as client:
        summary = client.wait(job_id, timeout=240)
        assert summary["status"] == "succeeded", summary
        assert summary["items_done"] == items
        results = client.results(job_id)
        assert len(results) == items
        params = []
        for result in results:
            png = Image.open(io.BytesIO(client.store.get_bytes(result["key"])))
            params.append(json.loads(png.text["farm"]))
        return params


def test_face_identity_job_with_two_references_and_two_prompts(
    farm_factory, tiny_models, sd15_adapter, tmp_path
) -> None:
    refs = [_face(tmp_path, "a.png", (180, 120, 90)), _face(tmp_path, "b.png", (150, 100, 80))]
    farm = farm_factory()
    farm.start_worker(["farm.control", "farm.gpu.sd15"])
    with farm.client() as client:
        averaged = client.submit(identity_job(tiny_models["sd15"], sd15_adapter, refs))
        plain = client.submit(
            {k: v for k, v in identity_job(tiny_models["sd15"], sd15_adapter, refs).items() if k != "identity"}
            | {"kind": "text_to_image", "output_prefix": "plain"}
        )
    params = _check(farm, averaged, 2)
    assert {p["prompt"] for p in params} == {"a portrait, studio light", "a portrait, outdoors"}
    identity = params[0]["identity"]
    assert identity["combine"] == "average" and len(identity["references"]) == 2
    assert all(key.startswith("inputs/sha256/") for key in identity["references"])
    _check(farm, plain, 2)
    with farm.client() as client:
        face = {r["item_index"]: client.store.get_bytes(r["key"]) for r in client.results(averaged)}
        text = {r["item_index"]: client.store.get_bytes(r["key"]) for r in client.results(plain)}
    decoded = {i: Image.open(io.BytesIO(face[i])).convert("RGB").tobytes() for i in face}
    assert all(decoded[i] != Image.open(io.BytesIO(text[i])).convert("RGB").tobytes() for i in face)  # identity acts


@pytest.mark.integration
def test_face_identity_on_real_services_with_frames_and_a_bad_reference(
    farm_factory, tiny_models, sd15_adapter, tmp_path, pg_url, redis_url, seaweedfs
) -> None:
    refs = [_face(tmp_path, "a.png", (180, 120, 90)), _face(tmp_path, "b.png", (90, 60, 40))]
    farm = farm_factory(broker=redis_url, db_url=pg_url, s3=seaweedfs)
    farm.start_worker(["farm.control", "farm.gpu.sd15"])
    with farm.client() as client:
        job = identity_job(
            tiny_models["sd15"], sd15_adapter, refs, frames=[{"path": str(refs[1])}, {"path": str(refs[0])}]
        )
        job["identity"] |= {"combine": "separate", "mode": "fooocus", "stop": 0.7}
        job["sag"] = {"scale": 0.6, "blur_sigma": 1.0}  # composes with the image prompts in one set
        job["idempotency_key"] = f"faces-{time.time_ns()}"
        separate = client.submit(job)
        client.store.put_bytes("inputs/not-a-face.png", b"\x89PNG broken")
        broken = identity_job(tiny_models["sd15"], sd15_adapter, refs)
        broken["identity"]["references"] = [{"key": "inputs/not-a-face.png"}]
        bad = client.submit(broken)
    params = _check(farm, separate, 4)
    assert sorted((p["frame"]["index"], p["prompt"]) for p in params)[0] == (0, "a portrait, outdoors")
    assert {p["identity"]["mode"] for p in params} == {"fooocus"}
    assert {p["sag"]["scale"] for p in params} == {0.6}
    with farm.client() as client:
        summary = client.wait(bad, timeout=240)
    assert summary["status"] == "failed"
    assert all("identity.references[0] (inputs/not-a-face.png)" in s["error"] for s in summary["shards"])
    assert all(s["attempts"] == 1 for s in summary["shards"])


def test_switching_jobs_reuses_the_pinned_adapter_and_encoder(
    tiny_models, sd15_adapter, tmp_path, in_process_worker
) -> None:
    worker = in_process_worker()
    refs = [_face(tmp_path, "a.png", (180, 120, 90)), _face(tmp_path, "b.png", (60, 40, 30))]
    outcomes = []
    for n, ref in enumerate(refs):
        job = identity_job(tiny_models["sd15"], sd15_adapter, [ref], prompts=["a face"], output_prefix=f"job{n}")
        outcomes += worker.run(job)[1]
    assert outcomes == ["succeeded", "succeeded"]
    cache, components = worker.res.model_cache(), worker.res.component_cache()
    assert (cache.loads, cache.hits) == (1, 1)  # the pipeline stayed pinned
    assert components.loads == 2 and components.hits == 2  # adapter + encoder, loaded once each
    patcher = cache.get(str(tiny_models["sd15"]), "sd15").patcher
    assert patcher.applies == 2 and patcher.active is not None  # only the image-prompt patch changed
