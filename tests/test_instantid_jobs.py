"""face_identity jobs with InstantID through real workers: tiny SDXL, a fabricated InstantID
checkpoint, a tiny ONNX face pack and a tiny IdentityNet."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from farm.specs import SpecError, parse_spec

pytest.importorskip("insightface")

IDENTITY = {"method": "instantid", "checkpoint": "/m/ip-adapter.bin", "references": [{"key": "inputs/a.png"}]}


def _spec(identity: dict) -> dict:
    return {
        "kind": "face_identity",
        "model": "/m",
        "family": "sdxl",
        "prompts": ["a"],
        "seeds": [1],
        "identity": identity,
    }


@pytest.mark.parametrize(
    ("identity", "field", "reason"),
    [
        ({"weight": 3.5}, "identity.weight", "less than or equal to 3"),
        ({"start_at": 0.6, "end_at": 0.2}, "identity.start_at", "must not be after end_at"),
        ({"noise": 1.5}, "identity.noise", "less than or equal to 1"),
        ({"combine": "max"}, "identity.combine", "'average', 'norm_average' or 'concat'"),
        ({"pose": {"key": "inputs/p.png"}}, "identity.pose", "needs identity.controlnet"),
        ({"controlnet": "models/cn"}, "identity.controlnet", "must be a local path"),
        ({"mask_resize": "bilinear"}, "identity.mask_resize", "needs identity.mask"),
        ({"mask": {"key": "inputs/m.png"}, "mask_resize": "area"}, "identity.mask_resize", "'bicubic' or 'bilinear'"),
    ],
)
def test_invalid_instantid_settings_name_the_field(identity: dict, field: str, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_spec({**IDENTITY, **identity}))
    problems = dict(info.value.problems)
    assert field in problems and reason in problems[field], problems


def test_mask_resize_defaults_to_bicubic_and_survives_the_json_round_trip() -> None:
    plain = parse_spec(_spec(IDENTITY))
    assert plain.identity.mask_resize == "bicubic"
    assert parse_spec(json.loads(plain.model_dump_json())) == plain  # stored specs parse again
    masked = parse_spec(_spec({**IDENTITY, "mask": {"key": "inputs/m.png"}, "mask_resize": "bilinear"}))
    assert parse_spec(json.loads(masked.model_dump_json())).identity.mask_resize == "bilinear"


def face(path: Path, shade: int) -> Path:
    pixels = np.full((160, 160, 3), 128, np.uint8)
    pixels[40:120, 50:110] = shade
    pixels[60:70, 60:70] = 250
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    from farm.tiny_components import build_tiny_controlnet, build_tiny_face_pack, build_tiny_ip_adapter

    root = tmp_path_factory.mktemp("instantid-assets")
    checkpoint = build_tiny_ip_adapter(
        "sdxl", root / "instantid", plus=True, tokens=16, embedding_dim=512, image_encoder=False
    )
    flat = root / "flat.png"
    Image.new("RGB", (160, 160), (128, 128, 128)).save(flat)
    mask = root / "mask.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))).save(mask)
    return {
        "checkpoint": checkpoint / "ip-adapter.bin",
        "pack": build_tiny_face_pack(root / "antelopev2"),
        "controlnet": build_tiny_controlnet("sdxl", root / "identitynet"),
        "a": face(root / "a.png", 30),
        "b": face(root / "b.png", 60),
        "flat": flat,
        "mask": mask,
    }


def instantid_job(model: Path, assets: dict[str, Path], **identity: Any) -> dict[str, Any]:
    return {
        "kind": "face_identity",
        "model": str(model),
        "family": "sdxl",
        "prompts": ["a portrait"],
        "seeds": [3],
        "steps": 3,
        "width": 64,
        "height": 64,
        "guidance": 5.0,
        "shard_size": 1,
        "output_prefix": "instantid",
        "identity": {
            "method": "instantid",
            "checkpoint": str(assets["checkpoint"]),
            "references": [{"path": str(assets["a"])}, {"path": str(assets["b"])}],
            "noise": 0.35,
            **identity,
        },
    }


def test_instantid_jobs_end_to_end(farm_factory, tiny_models, assets, tmp_path: Path) -> None:
    farm = farm_factory()
    farm.start_worker(["farm.control", "farm.gpu.sdxl"], FARM_WORKER__FACE_MODELS_DIR=str(assets["pack"]))
    with farm.client() as client:
        # A frame without a face fails its shard with the reason; the other frame renders.
        frames = [{"path": str(assets["b"])}, {"path": str(assets["flat"])}]
        partial = client.submit(
            instantid_job(tiny_models["sdxl"], assets, mask={"path": str(assets["mask"])}) | {"frames": frames}
        )
        summary = client.wait(partial, timeout=300)
        assert summary["status"] == "partial", summary
        failed = [s for s in summary["shards"] if s["status"] == "failed"]
        assert len(failed) == 1 and failed[0]["attempts"] == 1
        assert "frames[1] '" in failed[0]["error"] and "flat.png' (inputs/sha256/" in failed[0]["error"]
        assert "no face detected" in failed[0]["error"]  # the field, the file as given, its key
        assert client.store.exists(f"instantid/{partial}/face_embeds.safetensors")

        # The worker carries on: IdentityNet with the face tokens and the reference keypoints.
        job = client.submit(
            instantid_job(tiny_models["sdxl"], assets, controlnet=str(assets["controlnet"]), controlnet_strength=0.9)
        )
        done = client.wait(job, timeout=300)
        assert done["status"] == "succeeded", done
        (result,) = client.results(job)
        params = json.loads(Image.open(io.BytesIO(client.store.get_bytes(result["key"]))).text["farm"])
        assert params["identity"]["method"] == "instantid" and params["identity"]["controlnet"]
        assert len(params["patches_fingerprint"]) == 64


def test_a_missing_face_pack_fails_clearly(farm_factory, tiny_models, assets, tmp_path: Path) -> None:
    farm = farm_factory()
    farm.start_worker(["farm.control", "farm.gpu.sdxl"], FARM_WORKER__FACE_MODELS_DIR=str(tmp_path / "nowhere"))
    with farm.client() as client:
        job = client.submit(instantid_job(tiny_models["sdxl"], assets))
        summary = client.wait(job, timeout=300)
    assert summary["status"] == "failed"
    error = summary["shards"][0]["error"]
    assert f"face models folder {tmp_path / 'nowhere'} does not exist" in error and "detector" in error


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_instantid_with_identitynet_and_sag(tiny_models, assets, in_process_worker, guidance: float) -> None:
    """SAG in one set with InstantID and IdentityNet (the ControlNet pipeline shares the UNet):
    the degraded pass takes the uncond chunk of the ControlNet residuals; without CFG (guidance
    1) the ones of the cond batch."""
    worker = in_process_worker(face_models_dir=str(assets["pack"]))
    images = []
    for n, sag in enumerate([None, {"scale": 1.0}]):
        job = instantid_job(tiny_models["sdxl"], assets, controlnet=str(assets["controlnet"]))
        job |= {"guidance": guidance, "output_prefix": f"run{n}"} | ({"sag": sag} if sag else {})
        job_id, outcomes = worker.run(job)
        assert outcomes == ["succeeded"]
        ((params, image),) = worker.outputs(job_id)
        images.append(image)
    assert params["sag"] == {"scale": 1.0, "blur_sigma": 2.0} and params["identity"]["controlnet"]
    assert images[0] != images[1]
