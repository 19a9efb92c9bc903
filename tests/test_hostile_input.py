"""Hostile input (issue 11, "Bad input"): every bad spec or file is refused with a clear error that
names the field, and leaves nothing behind.

- Submit-time refusals go through the real client (Postgres, SeaweedFS, Redis): the error is a
  ``UserError`` naming the field and the reason, and no job, shard, artifact or bulk row and no
  object in the bucket is added (both counted before and after).
- Worker-side refusals (no face, corrupt or truncated ``.safetensors``, a pickle ``.bin`` with code
  in it, unknown or broken models) run on one real worker process: each shard fails at its first
  attempt with its reason, the job ends failed or partial, no object is half-written, the pickle's
  code never runs, and the same worker then renders a good job.
- Property-based fuzzing (beyond ``test_specs.py`` / ``test_keys.py``): mutated specs of every job
  kind either parse or raise ``SpecError`` whose paths name real fields; every key a valid spec
  plans stays under its prefix; manifest row ids never make an unsafe key.

Each case writes one row of the reliability report (``fault_table``, section "Bad input").
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from farm.errors import InvalidKey, UserError
from farm.inputs import InputImageError
from farm.job_spec import MAX_PROMPTS, SpecError
from farm.kinds import KINDS
from farm.spec_files import MAX_SPEC_DEPTH, MAX_SPEC_VALUES
from farm.specs import parse_spec, spec_fingerprint
from storage.db import make_engine
from storage.objects.keys import (
    MAX_PART_LENGTH,
    artifact_key,
    contact_sheet_key,
    job_prefix,
    join_key,
    manifest_key,
    validate_key,
    validate_part,
    validate_prefix,
)

SECTION = "Bad input"
JOB = uuid.UUID("00000000-0000-4000-8000-00000000cafe")
SHA = "a" * 64
REF = {"key": f"inputs/sha256/{SHA}.png", "sha256": SHA}


# -- files -------------------------------------------------------------------------------------------
def png(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb's shape)."""
    data = bytearray(png((1, 1)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def face_png(path: Path, shade: int = 40) -> Path:
    """A face the tiny face pack detects (a dark block with an eye-like bright spot)."""
    image = Image.new("RGB", (160, 160), (128, 128, 128))
    image.paste(Image.new("RGB", (60, 80), (shade,) * 3), (50, 40))
    image.paste(Image.new("RGB", (10, 10), (250,) * 3), (60, 60))
    image.save(path)
    return path


def flat_png(path: Path) -> Path:
    """An image with no face in it."""
    Image.new("RGB", (160, 160), (128, 128, 128)).save(path)
    return path


class _TouchMarker:
    """A pickle payload whose code creates a marker file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


# -- specs -------------------------------------------------------------------------------------------
def t2i(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": "/models/sd15",
        "family": "sd15",
        "prompts": ["a red cube"],
        "seeds": [1],
        "steps": 4,
        "width": 64,
        "height": 64,
        "output_prefix": "hostile",
    }
    spec.update(overrides)
    return spec


def _with_identity(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return spec | {"identity": spec["identity"] | changes}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in t2i().items() if k != name}


def identity(references: list[Any], **overrides: Any) -> dict[str, Any]:
    """An ip_adapter face_identity spec (paths only: nothing is loaded at submit time)."""
    ident = {
        "method": "ip_adapter",
        "adapter": "/models/ip.safetensors",
        "image_encoder": "/models/encoder",
        "references": references,
    }
    return t2i(kind="face_identity", identity=ident, **overrides)


def video(**overrides: Any) -> dict[str, Any]:
    spec = {
        "kind": "temporal_video",
        "model": "/models/svd",
        "family": "svd",
        "images": [REF],
        "seeds": [1],
        "num_frames": 4,
        "width": 64,
        "height": 64,
        "output_prefix": "hostile",
    }
    spec.update(overrides)
    return spec


# -- the submit-time table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hostile:
    """One hostile submission: what is sent, and the field and reason the refusal must name."""

    id: str
    fault: str
    injected: str
    field: str
    reason: str
    make: Callable[[Path], Any]  # builds what is submitted, in the test's tmp folder
    error: type[Exception] = SpecError
    submit: str = "spec"  # spec | bulk
    marker: bool = False  # the input carries code that would create tmp/PWNED if it ran


def _file(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return make


def _spec_with_files(files: dict[str, bytes], build: Callable[[Path], dict]) -> Callable[[Path], dict]:
    def make(tmp: Path) -> dict:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        return build(tmp)

    return make


def _yaml_with_code(tmp: Path) -> Path:
    path = tmp / "job.yaml"
    spec = "\n".join(f"{k}: {json.dumps(v)}" for k, v in t2i().items())
    path.write_text(f"{spec}\nnegative_prompt: !!python/object/apply:os.mkdir [{json.dumps(str(tmp / 'PWNED'))}]\n")
    return path


def _yaml_bomb(tmp: Path) -> Path:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for n in range(1, 9):
        lines.append(f"{'abcdefghi'[n]}: &{'abcdefghi'[n]} [{', '.join(['*' + 'abcdefghi'[n - 1]] * 9)}]")
    spec = "\n".join(f"{k}: {json.dumps(v)}" for k, v in without("prompts").items())
    path = tmp / "bomb.yaml"
    path.write_text("\n".join(lines) + f"\n{spec}\nprompts: *i\n")
    return path


def _bulk_traversal(tmp: Path) -> tuple[str, dict, Path]:
    manifest = tmp / "rows.jsonl"
    manifest.write_text('{"id": "r1", "prompt": "a cat"}\n')
    return "../../escape", t2i(), manifest


HOSTILE: list[Hostile] = [
    # missing and extra fields
    Hostile("missing-prompts", "missing field: prompts", "spec without 'prompts'", "prompts",
            "required field is missing", lambda tmp: without("prompts")),
    Hostile("missing-model", "missing field: model", "spec without 'model'", "model",
            "required field is missing", lambda tmp: without("model")),
    Hostile("missing-seeds", "missing field: seeds", "spec without 'seeds' or 'base_seed'+'count'", "seeds",
            "missing: give 'seeds'", lambda tmp: without("seeds")),
    Hostile("missing-identity", "missing field: identity", "face_identity spec without 'identity'", "identity",
            "required field is missing", lambda tmp: t2i(kind="face_identity")),
    Hostile("extra-field", "extra field (typo)", "'stpes: 30' beside 'steps'", "stpes", "unknown field",
            lambda tmp: t2i(stpes=30)),
    Hostile("extra-nested-field", "extra nested field", "identity.exec = 'rm -rf /'", "identity.exec",
            "unknown field", lambda tmp: _with_identity(identity([REF]), exec="rm -rf /")),
    Hostile("unknown-kind", "unknown job kind", "kind: 'shell'", "kind", "unknown job kind 'shell'",
            lambda tmp: t2i(kind="shell")),
    Hostile("not-a-mapping", "spec is not a mapping", "a JSON list as the whole spec", "spec",
            "must be a mapping of fields, not list", _file("list.json", "[1, 2, 3]")),
    # negative or huge numbers
    Hostile("steps-negative", "negative steps", "steps: -5", "steps", "greater than or equal to 1",
            lambda tmp: t2i(steps=-5)),
    Hostile("steps-huge", "huge steps", "steps: 10**9", "steps", "less than or equal to 150",
            lambda tmp: t2i(steps=10**9)),
    Hostile("width-negative", "negative width", "width: -512", "width", "greater than or equal to 64",
            lambda tmp: t2i(width=-512)),
    Hostile("height-huge", "huge height", "height: 2**31", "height", "less than or equal to 2048",
            lambda tmp: t2i(height=2**31)),
    Hostile("guidance-nan", "NaN guidance", "'guidance': NaN in a JSON file", "guidance", "finite number",
            _file("nan.json", json.dumps(t2i()).replace('"steps": 4', '"steps": 4, "guidance": NaN'))),
    Hostile("seed-negative", "negative seed", "seeds: [-1]", "seeds[0]", "greater than or equal to 0",
            lambda tmp: t2i(seeds=[-1])),
    Hostile("seed-huge", "seed above 2**63-1", "seeds: [2**64]", "seeds[0]", "less than or equal to",
            lambda tmp: t2i(seeds=[2**64])),
    Hostile("count-huge", "huge seed count", "base_seed: 0, count: 10**12", "count", "less than or equal to 10000",
            lambda tmp: without("seeds") | {"base_seed": 0, "count": 10**12}),
    Hostile("seed-overflow", "seed range past the largest seed", "base_seed: 2**63-2, count: 5", "count",
            "exceeds the largest seed", lambda tmp: without("seeds") | {"base_seed": 2**63 - 2, "count": 5}),
    Hostile("frames-over-limit", "10,001 identity frames", "frames: 10,001 image refs", "frames",
            "at most 10000 items", lambda tmp: identity([REF], frames=[REF] * 10_001)),
    Hostile("video-frames-huge", "huge video frame count", "num_frames: 10**6", "num_frames",
            "less than or equal to 64", lambda tmp: video(num_frames=10**6)),
    Hostile("video-segments-negative", "negative video segments", "segments: -1", "segments",
            "greater than or equal to 1", lambda tmp: video(segments=-1)),
    Hostile("prompts-10k", "10,000-prompt spec", "prompts: 10,000 strings", "prompts",
            f"at most {MAX_PROMPTS} items", lambda tmp: t2i(prompts=[f"prompt {i}" for i in range(10_000)])),
    Hostile("items-over-limit", "prompts x seeds over the item limit", "1,000 prompts x 101 seeds", "spec",
            "= 101000 items; a job may have at most 100000",
            lambda tmp: without("seeds") | {"prompts": [f"p{i}" for i in range(1000)], "base_seed": 0, "count": 101}),
    Hostile("prompt-nul", "NUL byte in a prompt", "prompts: ['a\\x00b']", "prompts[0]",
            "must not contain control characters", lambda tmp: t2i(prompts=["a\x00b"])),
    # uploads
    Hostile("upload-not-image", "non-image upload", "identity reference: a text file named face.png",
            "identity.references[0]", "not an image", _spec_with_files(
                {"face.png": b"#!/bin/sh\necho not an image\n"},
                lambda tmp: identity([{"path": str(tmp / "face.png")}])), InputImageError),
    Hostile("upload-truncated", "truncated image upload", "identity reference: a PNG cut after 80 bytes",
            "identity.references[0]", "unreadable image", _spec_with_files(
                {"cut.png": png()[:80]}, lambda tmp: identity([{"path": str(tmp / "cut.png")}])), InputImageError),
    Hostile("upload-bomb", "decompression bomb upload", "a 1x1 PNG whose header says 9000x9000 (81 Mpx)",
            "identity.references[0]", "more than 64 megapixels", _spec_with_files(
                {"bomb.png": bomb_png(9000, 9000)}, lambda tmp: identity([{"path": str(tmp / "bomb.png")}])),
            InputImageError),
    Hostile("upload-then-bad-field", "good image, bad field elsewhere", "valid reference PNG + steps: 0",
            "steps", "greater than or equal to 1", _spec_with_files(
                {"ok.png": png()}, lambda tmp: identity([{"path": str(tmp / "ok.png")}], steps=0))),
    # models
    Hostile("model-url", "model given as a URL", "model: 'http://evil.example/m'", "model",
            "URLs are not supported", lambda tmp: t2i(model="http://evil.example/m")),
    Hostile("model-not-a-path", "model neither a hub id nor a path", "model: 'a b c'", "model",
            "must be a hub id 'org/name' or a local folder path", lambda tmp: t2i(model="a b c")),
    Hostile("adapter-not-local", "adapter path not local", "identity.adapter: 'evil.org/ip.bin'",
            "identity.adapter", "must be a local path",
            lambda tmp: _with_identity(identity([REF]), adapter="evil.org/ip.bin")),
    # traversal in prefixes and names
    Hostile("prefix-traversal", "path traversal in output_prefix", "output_prefix: '../../etc'", "output_prefix",
            "is not allowed", lambda tmp: t2i(output_prefix="../../etc")),
    Hostile("prefix-absolute", "absolute output_prefix", "output_prefix: '/etc/cron.d'", "output_prefix",
            "must be relative", lambda tmp: t2i(output_prefix="/etc/cron.d")),
    Hostile("prefix-inner-dots", "'..' inside output_prefix", "output_prefix: 'renders/../../x'", "output_prefix",
            "is not allowed", lambda tmp: t2i(output_prefix="renders/../../x")),
    Hostile("prefix-backslash", "backslash traversal in output_prefix", "output_prefix: 'a\\\\..\\\\b'",
            "output_prefix", "is not allowed", lambda tmp: t2i(output_prefix="a\\..\\b")),
    Hostile("prefix-control", "control character in output_prefix", "output_prefix: 'a\\nb'", "output_prefix",
            "is not allowed", lambda tmp: t2i(output_prefix="a\nb")),
    Hostile("ref-key-traversal", "path traversal in an image key", "references: [{key: 'inputs/../../secret.png'}]",
            "identity.references[0].key", "is not allowed",
            lambda tmp: identity([{"key": "inputs/../../secret.png"}])),
    Hostile("ref-key-absolute", "absolute image key", "frames: [{key: '/etc/passwd'}]", "frames[0].key",
            "must be relative", lambda tmp: identity([REF], frames=[{"key": "/etc/passwd"}])),
    Hostile("idempotency-traversal", "path traversal in idempotency_key", "idempotency_key: '../jobs/x'",
            "idempotency_key", "must be 1-128 characters", lambda tmp: t2i(idempotency_key="../jobs/x")),
    Hostile("bulk-name-traversal", "path traversal in a bulk name", "farm bulk submit '../../escape'", "name",
            "is not allowed", _bulk_traversal, InvalidKey, submit="bulk"),
    # spec files
    Hostile("yaml-python-tag", "YAML with code (python tag)", "!!python/object/apply:os.mkdir", "file",
            "could not determine a constructor", _yaml_with_code, marker=True),
    Hostile("yaml-bomb", "YAML alias bomb (billion laughs)", "9 levels of 9 aliases (9**9 values) as prompts",
            "file", f"expands to more than {MAX_SPEC_VALUES} values", _yaml_bomb),
    Hostile("yaml-cycle", "YAML alias inside itself", "prompts: &p ['a', *p]", "file", "refers to itself",
            _file("cycle.yaml", "\n".join(f"{k}: {json.dumps(v)}" for k, v in without("prompts").items())
                  + "\nprompts: &p [\"a\", *p]\n")),
    Hostile("json-deep", "deeply nested JSON", "50,000 nested lists", "file", "is not valid JSON",
            _file("deep.json", '{"prompts": ' + "[" * 50_000 + "]" * 50_000 + "}")),
    Hostile("json-nested", "nested JSON within the parser's reach", "prompts nested 500 lists deep", "file",
            f"nested more than {MAX_SPEC_DEPTH} levels deep",
            _file("nested.json", json.dumps(without("prompts"))[:-1] + ', "prompts": ' + "[" * 500 + "]" * 500 + "}")),
    Hostile("json-duplicate-key", "duplicate key in JSON", '"steps" twice', "file", "duplicate key 'steps'",
            _file("dup.json", json.dumps(t2i())[:-1] + ', "steps": 150}')),
    Hostile("file-huge", "spec file over 1 MiB", "a 1.1 MiB YAML file", "file", "is larger than 1048576 bytes",
            _file("huge.yaml", "prompts: [" + ", ".join(['"x"'] * 300_000) + "]\n")),
]  # fmt: skip


def _bucket_keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(obj["Key"] for obj in page.get("Contents", ()))
    return keys


@dataclass
class SubmitSide:
    """The real client of one farm (Postgres, Redis, a SeaweedFS bucket), and what it can leave."""

    client: Any
    engine: Any
    s3: Any
    bucket: str

    def rows(self) -> dict[str, int]:
        """Rows in every table a submission writes."""
        from sqlalchemy import func, select

        from storage.models import Artifact, BulkJob, Job, Shard

        with self.engine.connect() as conn:
            return {
                model.__tablename__: conn.scalar(select(func.count()).select_from(model))
                for model in (Job, Shard, Artifact, BulkJob)
            }

    def keys(self) -> set[str]:
        """Every object in the bucket."""
        return _bucket_keys(self.s3, self.bucket)


@pytest.fixture(scope="module")
def submit_side(shared_pg_url, redis_url, seaweedfs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubmitSide]:
    """One farm client for every submit-time case (building one per case costs a second each)."""
    from farm.client import FarmClient
    from farm.settings import FarmSettings

    bucket = f"hostile-{uuid.uuid4().hex[:10]}"
    s3 = {
        "endpoint_url": seaweedfs.endpoint_url,
        "access_key_id": seaweedfs.access_key_id,
        "secret_access_key": seaweedfs.secret_access_key,
        "bucket": bucket,
        "create_bucket": True,
    }
    settings = FarmSettings(
        _env_file=None,
        data_dir=tmp_path_factory.mktemp("farm-data"),
        db={"url": shared_pg_url},
        broker={"url": redis_url},
        storage={"backend": "s3", "s3": s3},
    )
    client = FarmClient(settings)
    client.store.ensure_bucket()
    engine = make_engine(shared_pg_url)
    yield SubmitSide(client, engine, seaweedfs.boto3_client(), bucket)
    client.close()
    engine.dispose()


def _short(error: BaseException, limit: int = 220) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text if len(text) <= limit else text[: limit - 3] + '...'}"


@pytest.mark.integration
@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_submit_time_refusal(case: Hostile, submit_side: SubmitSide, tmp_path: Path, fault_table) -> None:
    row = fault_table.row(
        SECTION, case.fault, case.injected, f"{case.error.__name__} naming {case.field}; 0 rows, 0 objects added"
    )
    submitted = case.make(tmp_path)
    rows_before, keys_before = submit_side.rows(), submit_side.keys()
    started = time.perf_counter()
    with pytest.raises(UserError) as info:
        if case.submit == "bulk":
            submit_side.client.submit_bulk(*submitted)
        else:
            submit_side.client.submit(submitted)
    seconds = time.perf_counter() - started
    rows_after, keys_after = submit_side.rows(), submit_side.keys()
    error = info.value
    added_rows = {k: rows_after[k] - rows_before[k] for k in rows_after if rows_after[k] != rows_before[k]}
    added_keys = sorted(keys_after - keys_before)
    row.observed = (
        f"{_short(error)} ({seconds:.2f} s); rows added: {sum(added_rows.values())}, objects added: {len(added_keys)}"
    )
    assert isinstance(error, case.error) and isinstance(error, ValueError), row.observed
    assert not error.retryable
    message = str(error)
    assert case.field in message and case.reason in message, message
    assert "\x00" not in message and "\x1b" not in message and len(message) < 2000
    if isinstance(error, SpecError):  # the field path is structured, not only in the text
        assert any(path == case.field and case.reason in reason for path, reason in error.problems), error.problems
    assert added_rows == {} and added_keys == [], row.observed
    if case.marker:
        assert not (tmp_path / "PWNED").exists(), "the spec file's code ran"
        import yaml

        yaml.load(submitted.read_text(), Loader=yaml.UnsafeLoader)  # proves the payload is live
        assert (tmp_path / "PWNED").exists()


# -- worker-side refusals ---------------------------------------------------------------------------------
@dataclass
class WorkerCase:
    """A job whose input only a worker can judge, and what its refused shard must say."""

    fault: str
    injected: str
    spec: dict[str, Any]
    reason: list[str]  # fragments the failed shard's error must contain
    status: str = "failed"
    job_id: uuid.UUID | None = None
    extra: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def identity_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("insightface")
    pytest.importorskip("diffusers")
    import torch

    from farm.tiny_components import build_tiny_face_pack, build_tiny_ip_adapter

    root = tmp_path_factory.mktemp("hostile-assets")
    checkpoint = build_tiny_ip_adapter(
        "sdxl", root / "instantid", plus=True, tokens=16, embedding_dim=512, image_encoder=False
    )
    good = (checkpoint / "ip-adapter.safetensors").read_bytes()
    (root / "garbage.safetensors").write_bytes(b"\xff" * 8 + b"not a safetensors file" * 20)
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    evil = root / "evil.bin"
    torch.save({"image_proj": {"latents": _TouchMarker(root / "PWNED")}, "ip_adapter": {}}, evil)
    return {
        "checkpoint": checkpoint / "ip-adapter.safetensors",
        "garbage": root / "garbage.safetensors",
        "truncated": root / "truncated.safetensors",
        "evil": evil,
        "marker": root / "PWNED",
        "pack": build_tiny_face_pack(root / "antelopev2"),
        "face": face_png(root / "face.png"),
        "flat": flat_png(root / "flat.png"),
        "root": root,
    }


def _instantid_job(model: Path, assets: dict[str, Path], checkpoint: Path | None = None, **overrides: Any) -> dict:
    spec = {
        "kind": "face_identity",
        "model": str(model),
        "family": "sdxl",
        "prompts": ["a portrait"],
        "seeds": [5],
        "steps": 2,
        "width": 64,
        "height": 64,
        "guidance": 5.0,
        "shard_size": 1,
        "output_prefix": "hostile",
        "identity": {
            "method": "instantid",
            "checkpoint": str(checkpoint or assets["checkpoint"]),
            "references": [{"path": str(assets["face"])}],
        },
    }
    spec.update(overrides)
    return spec


JOB_FILES = ("manifest.json", "contact_sheet.png", "face_embeds.safetensors")  # beside a job's outputs


def _artifact_keys(engine: Any, job_id: uuid.UUID) -> set[str]:
    from sqlalchemy import select

    from storage.models import Artifact

    with engine.connect() as conn:
        return set(conn.scalars(select(Artifact.key).where(Artifact.job_id == job_id)))


@pytest.mark.integration
@pytest.mark.slow
def test_worker_side_refusals_then_a_good_job(
    farm_factory, tiny_models, identity_assets, empty_pg_url, redis_url, seaweedfs, tmp_path, fault_table, request
) -> None:
    """One real worker takes eight bad identity jobs, each refused with its reason at the first
    attempt and nothing half-written, then renders a good job."""
    assets = identity_assets
    model = tiny_models["sdxl"]
    broken_model = tmp_path / "broken-sdxl"  # a pipeline folder whose UNet weights are cut short
    shutil.copytree(model, broken_model)
    weights = broken_model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    bad_index = tmp_path / "bad-index"  # a folder whose model_index.json is not JSON
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text('{"_class_name": StableDiffusionXLPipeline')
    flat, face = {"path": str(assets["flat"])}, {"path": str(assets["face"])}
    cases = [
        WorkerCase("image with no face (reference)", "identity reference: a flat grey image",
                   _with_identity(_instantid_job(model, assets), references=[flat]),
                   ["identity.references[0] '", "flat.png' (inputs/sha256/", "no face detected"]),
        WorkerCase("image with no face (one frame of two)", "frames: [face, flat grey image]",
                   _instantid_job(model, assets, frames=[face, flat]),
                   ["frames[1] '", "flat.png' (inputs/sha256/", "no face detected"], status="partial"),
        WorkerCase("corrupt .safetensors", f"identity.checkpoint: {assets['garbage'].stat().st_size} bytes of junk "
                   "named .safetensors",
                   _instantid_job(model, assets, assets["garbage"]),
                   ["identity.checkpoint: garbage.safetensors is not a loadable IP-Adapter checkpoint"]),
        WorkerCase("truncated .safetensors", "identity.checkpoint: a real checkpoint cut in half",
                   _instantid_job(model, assets, assets["truncated"]),
                   ["identity.checkpoint: truncated.safetensors is not a loadable", "deserializing header"]),
        WorkerCase("pickle .bin with code in it", "identity.checkpoint: torch.save of an object whose "
                   "__reduce__ calls Path.touch(marker)", _instantid_job(model, assets, assets["evil"]),
                   ["identity.checkpoint: evil.bin", "refused, it holds pickled code", "nothing in it was run"]),
        WorkerCase("unknown model path", "model: a folder that does not exist",
                   _instantid_job(tmp_path / "no-such-model", assets), ["no-such-model", "no such folder"]),
        WorkerCase("corrupt model weights (.safetensors)", "model folder whose UNet safetensors is cut to a third",
                   _instantid_job(broken_model, assets),
                   ["broken-sdxl' could not be loaded", "unet/diffusion_pytorch_model.safetensors"]),
        WorkerCase("corrupt model folder (model_index.json)", "model folder whose model_index.json is not JSON",
                   _instantid_job(bad_index, assets), ["bad-index': model_index.json is not a readable JSON file"]),
    ]  # fmt: skip
    rows = [fault_table.row(SECTION, c.fault, c.injected, f"job {c.status}: the bad shard fails at attempt 1 with "
                            "its reason; nothing half-written; worker carries on") for c in cases]  # fmt: skip
    good_row = fault_table.row(SECTION, "good job after the bad ones", "same worker process, valid InstantID job",
                               "succeeds on the same worker")  # fmt: skip
    farm = farm_factory(broker=redis_url, db_url=empty_pg_url, s3=seaweedfs)
    bucket, s3 = farm.env["FARM_STORAGE__S3__BUCKET"], seaweedfs.boto3_client()
    worker = farm.start_worker(["farm.control", "farm.gpu.sdxl"], FARM_WORKER__FACE_MODELS_DIR=str(assets["pack"]))
    engine = make_engine(empty_pg_url)
    request.addfinalizer(engine.dispose)
    with farm.client() as client:
        for case in cases:
            case.job_id = client.submit(case.spec)
        for case, row in zip(cases, rows, strict=True):
            summary = client.wait(case.job_id, timeout=120)
            failed = [s for s in summary["shards"] if s["status"] == "failed"]
            objects = _bucket_keys(s3, bucket, f"hostile/{case.job_id}/")
            artifacts = _artifact_keys(engine, case.job_id)
            leftovers = objects - artifacts - {f"hostile/{case.job_id}/{name}" for name in JOB_FILES}
            error = failed[0]["error"] if failed else ""
            row.observed = (
                f"job {summary['status']}; {len(failed)}/{len(summary['shards'])} shards failed after "
                f"{[s['attempts'] for s in failed]} attempt(s): {error[:200]!r}; {len(artifacts)} artifacts, "
                f"{len(leftovers)} stray objects"
            )
            assert summary["status"] == case.status, row.observed
            assert len(failed) == 1 and failed[0]["attempts"] == 1 and failed[0]["worker"] == worker.name, row.observed
            assert all(fragment in error for fragment in case.reason), row.observed
            assert "\x1b" not in error and "Traceback" not in error and len(error) < 600
            # Nothing half-written: every object under the job is an artifact or a job-level file,
            # and the failed shard recorded no artifact.
            assert leftovers == set(), leftovers
            failed_index = f"/{failed[0]['index']:05d}/"
            assert not any(failed_index in key for key in objects | artifacts)
            assert len(artifacts) == summary["items_done"] == (1 if case.status == "partial" else 0)
            if case.spec["identity"]["checkpoint"] == str(assets["evil"]):
                marker_ran = assets["marker"].exists()
                row.observed += f"; marker file {'CREATED' if marker_ran else 'absent'}"
                assert not marker_ran, "the pickle's code ran on the worker"

        # The same worker process keeps serving: a good job renders.
        good = client.submit(_instantid_job(model, assets))
        summary = client.wait(good, timeout=120)
        good_row.observed = (
            f"job {summary['status']} on {summary['shards'][0]['worker']} (pid {worker.proc.pid}, alive: "
            f"{worker.proc.poll() is None}); {summary['items_done']} item(s)"
        )
        assert summary["status"] == "succeeded", summary
        assert summary["shards"][0]["worker"] == worker.name and worker.proc.poll() is None
        assert len(client.results(good)) == 1

    import torch

    torch.load(assets["evil"], weights_only=False)  # proves the payload is live
    assert assets["marker"].exists()
    assets["marker"].unlink()


# -- fuzzing: spec parsing -------------------------------------------------------------------------------
VALID_BASES: dict[str, dict[str, Any]] = {
    "text_to_image": t2i(prompts=["a", "b"], seeds=[1, 2], shard_size=3, sag={"scale": 0.5}),
    "face_identity/ip_adapter": identity([REF, REF], frames=[REF], seeds=[3]),
    "face_identity/instantid": t2i(
        kind="face_identity",
        family="sdxl",
        identity={
            "method": "instantid",
            "checkpoint": "/m/ip-adapter.bin",
            "references": [REF],
            "mask": REF,
            "controlnet": "/m/cn",
            "pose": REF,
        },
    ),
    "temporal_video": video(images=[REF, REF], seeds=[1, 2], segments=2),
    # post-steps: their outputs go beside their source's; planned here under the same prefix
    **{
        kind: {"kind": kind, "source_job": str(uuid.UUID(int=5)), "output_prefix": "hostile", **fields}
        for kind, fields in {
            "encode": {"fps": 12},
            "upscale": {"scale": 2, "parts": 2},
            "contact_sheet": {"title": "t"},
            "package": {"format": "webdataset"},
        }.items()
    },
}

# Strings a hostile user tries in any field: traversal, absolute paths, control characters, URLs,
# huge text, odd Unicode, look-alike numbers.
HOSTILE_TEXT = st.one_of(
    st.sampled_from(
        [
            "../../etc/passwd",
            "/etc/passwd",
            "..",
            ".",
            "",
            " ",
            "a\x00b",
            "a\nb",
            "\x1b[31mred",
            "C:\\Windows",
            "a\\..\\b",
            "file:///etc/passwd",
            "http://169.254.169.254/",
            "~root/.ssh/id_rsa",
            "%2e%2e/x",
            "\u202etxt.exe",
            "\ud800",
            "x" * 5000,
            "NaN",
            "1e309",
            "-0",
            "__proto__",
        ]
    ),
    st.text(alphabet="ab./\\ \x00\n~:%\u00e9", max_size=30),
)
# Values a field might well take, so that a fair share of mutated specs still parse.
PLAUSIBLE = st.integers(0, 64) | st.floats(0, 1) | st.sampled_from(["renders/a", "euler", "average", "/m/x.bin", "cat"])
DICT_KEYS = st.sampled_from(["key", "path", "type", "method"])
JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | HOSTILE_TEXT
    | PLAUSIBLE
    | st.just([])
    | st.just({}),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT | DICT_KEYS, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indexes), the root excluded."""
    out: list[tuple] = []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _mutate(data: dict[str, Any], path: tuple, op: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    *parents, last = path
    target: Any = data
    for part in parents:
        target = target[part]
    if op == "delete":
        del target[last]
    elif op == "add" and isinstance(target, dict):
        target[f"{last}_extra"] = value
    else:
        target[last] = value
    return data


@st.composite
def mutated_specs(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """A valid spec of some kind with one to three hostile mutations; returns it with the
    top-level keys it has (an error may name one of them, e.g. an unknown field)."""
    data = VALID_BASES[draw(st.sampled_from(sorted(VALID_BASES)))]
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        data = _mutate(data, path, draw(st.sampled_from(["set", "set", "delete", "add"])), draw(JSON_VALUE))
    return data, set(map(str, data))


def _assert_key_safe(key: str, under: str) -> None:
    assert key.startswith(under + "/"), (key, under)
    segments = key.split("/")
    assert all(segments) and ".." not in segments and "." not in segments
    assert not key.startswith("/") and all(len(s) <= MAX_PART_LENGTH and not s.startswith(".") for s in segments)
    assert all(ch.isascii() and ch.isprintable() and ch not in "\\ " for ch in key)
    assert ".." not in key
    assert validate_key(key) == key


def _planned_keys(spec: Any) -> list[str]:
    """Every object key a job of ``spec`` may write (outputs, frames, previews, job files)."""
    from farm.sharding import plan_shards
    from farm.worker.kinds.face_identity_instantid import EMBEDS_FILE
    from farm.worker.kinds.temporal_video import frame_key, preview_key

    keys = [manifest_key(spec.output_prefix, JOB), contact_sheet_key(spec.output_prefix, JOB)]
    keys.append(join_key(job_prefix(spec.output_prefix, JOB), EMBEDS_FILE))
    for shard in plan_shards(spec, JOB):
        for item in shard.to_params()["items"]:
            keys.append(item["key"])
            if spec.kind == "temporal_video":
                keys.append(preview_key(spec, JOB, shard.index, item))
                keys += [frame_key(spec, JOB, shard.index, item, f) for f in (0, spec.frames_per_clip - 1)]
    return keys


def test_fuzz_bases_are_valid_and_plan_safe_keys() -> None:
    """The fuzzers start from valid specs of every kind (else they would only ever see refusals)."""
    for data in VALID_BASES.values():
        spec = parse_spec(data)
        for key in _planned_keys(spec):
            _assert_key_safe(key, job_prefix("hostile", JOB))
    assert {parse_spec(d).kind for d in VALID_BASES.values()} == set(KINDS) - {"frames_test", "faces_test"}


def _field_roots(kind_model: Any) -> set[str]:
    return set(kind_model.model_fields) | {"spec", "kind"}


def _check_mutated_spec(data: dict[str, Any], sent: set[str]) -> str:
    """Any spec derived from a valid one of any kind either parses (then round-trips and plans only
    safe keys under its prefix) or raises SpecError whose every path is rooted at a field of the
    kind, at a key the user sent, or at ``spec``/``kind``."""
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        assert exc.problems
        kind = data.get("kind", "text_to_image")
        roots = _field_roots(KINDS[kind].spec) if isinstance(kind, str) and kind in KINDS else {"kind", "spec"}
        for path, reason in exc.problems:
            root = path.split(".")[0].split("[")[0]
            assert root in roots | sent or path.startswith("["), (path, reason)
            assert reason and "\x00" not in reason
        message = str(exc)
        assert message.startswith("invalid job spec: ") and exc.problems[0][0] in message
        assert isinstance(exc, UserError) and not exc.retryable
        return "refused"
    assert parse_spec(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec
    spec_fingerprint(spec)
    under = job_prefix(spec.output_prefix, JOB)
    for key in _planned_keys(spec):
        _assert_key_safe(key, under)
    return "parsed"


def test_fuzz_mutated_specs_parse_or_name_a_field(fault_table) -> None:
    row = fault_table.row(
        SECTION,
        "fuzzed specs of every job kind",
        "hypothesis: a valid spec of each kind with 1-3 hostile mutations (values, deletions, extra keys)",
        "parses (round-trips, keys under its prefix) or SpecError with field paths",
    )
    tally: Counter[str] = Counter()

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_specs())
    def run(case: tuple[dict[str, Any], set[str]]) -> None:
        tally[_check_mutated_spec(*case)] += 1

    run()
    row.observed = f"{tally['parsed']} parsed with safe keys, {tally['refused']} SpecError with field paths, 0 other"


PATH_FIELDS = [
    (base, target)
    for base in sorted(VALID_BASES)
    for target in ("output_prefix", "model", "idempotency_key", "ref_key")
    # ref_key: only where the spec has input images (not text_to_image, not the post-steps)
    if target != "ref_key" or {"identity", "images"} & set(VALID_BASES[base])
]


def _check_path_field(base: str, target: str, text: str) -> str:
    """A hostile string in a field that becomes a path or a key is refused naming that field, or
    it is harmless: prefixes and keys validate, keys planned from it stay under it."""
    data = json.loads(json.dumps(VALID_BASES[base]))
    if target == "ref_key":
        refs = data["identity"]["references"] if "identity" in data else data["images"]
        refs[0] = {"key": text}
        expected = "identity.references[0].key" if "identity" in data else "images[0].key"
    else:
        data[target] = text
        expected = target
    try:
        spec = parse_spec(data)
    except SpecError as exc:
        assert [path for path, _ in exc.problems] == [expected], exc.problems
        return "refused"
    if target == "output_prefix":
        assert spec.output_prefix == validate_prefix(text)
        for key in _planned_keys(spec):
            _assert_key_safe(key, job_prefix(spec.output_prefix, JOB))
    elif target == "ref_key":
        ref = spec.identity.references[0] if base.startswith("face") else spec.images[0]
        assert validate_key(ref.key) == ref.key == text and ".." not in text and not text.startswith("/")
    elif target == "model":
        assert "://" not in text and not any(ord(ch) < 32 or ord(ch) == 127 for ch in text)
    return "accepted"


def test_fuzz_hostile_strings_in_path_like_fields(fault_table) -> None:
    row = fault_table.row(
        SECTION,
        "fuzzed strings in path-like fields",
        "hypothesis: traversal, absolute, control, URL, huge text in output_prefix, model, idempotency_key, image keys",
        "SpecError naming exactly that field, or a safe value whose keys stay under the prefix",
    )
    tally: Counter[str] = Counter()

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(PATH_FIELDS), HOSTILE_TEXT | st.text(max_size=60))
    def run(where: tuple[str, str], text: str) -> None:
        tally[_check_path_field(*where, text)] += 1

    run()
    row.observed = f"{tally['refused']} refused naming the field, {tally['accepted']} accepted and safe, 0 other"


# -- fuzzing: object keys ------------------------------------------------------------------------------
SAFE_PART = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)  # some of each shape pass
PREFIX_PARTS = ["a", "b.c", "..", ".", "", "x y", "d\\e", "renders"]


def _check_artifact_key(prefix: str, job: Any, shard: int, item: Any) -> str:
    """Whatever the parts, a built key is refused (InvalidKey, a UserError naming the part) or
    lies exactly one job folder, one shard folder and one file below the normalised prefix."""
    try:
        key = artifact_key(prefix, job, shard, item, "png")
    except InvalidKey as exc:
        assert isinstance(exc, UserError) and any(
            name in str(exc) for name in ("prefix", "key", "job_id", "shard_index", "item")
        ), str(exc)
        return "refused"
    normal = validate_prefix(prefix)
    folder = job_prefix(prefix, job)
    assert folder == (f"{normal}/{job}" if normal else str(job))
    _assert_key_safe(key, folder)
    assert len(key.split("/")) == len(folder.split("/")) + 2
    manifest = manifest_key(prefix, job)
    assert manifest.startswith(folder + "/") and manifest.count("/") == folder.count("/") + 1
    return "built"


def _check_bulk_ids(ids: list[str], name: str) -> str:
    """Manifest row ids (user text) become key parts: a manifest is refused naming the line, or
    every row's key lies under ``{prefix}/{bulk name}/``."""
    from farm.bulk_manifest import read_manifest

    data = "\n".join(json.dumps({"id": i, "prompt": "a cat"}) for i in ids).encode()
    try:
        rows = read_manifest(data, "rows.jsonl")
    except UserError as exc:
        assert "line " in str(exc) or "no rows" in str(exc)
        return "refused"
    try:
        folder = join_key("renders", name)
    except InvalidKey:
        return "refused"
    for row in rows:
        try:  # as farm.bulk builds it
            key = join_key(folder, validate_part(f"{row.row_id}.png", "id"))
        except InvalidKey as exc:
            assert str(exc).startswith("id: ")
            return "refused"
        _assert_key_safe(key, folder)
    return "built"


def test_fuzz_keys_never_escape_their_prefix(fault_table) -> None:
    row = fault_table.row(
        SECTION,
        "fuzzed object-key parts",
        "hypothesis: prefixes, job ids, shard indexes, items and bulk row ids from traversal-prone text",
        "InvalidKey naming the part, or a key under its prefix: no '..', no leading '/', no control characters",
    )
    tally: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None)
    @given(
        prefix=HOSTILE_TEXT | st.lists(st.sampled_from(PREFIX_PARTS), max_size=4).map("/".join),
        job=st.one_of(st.uuids(), HOSTILE_TEXT),
        shard=st.integers(-1, 100_000),
        item=st.one_of(st.integers(-1, 10**7), HOSTILE_TEXT),
    )
    def artifact_keys(prefix: str, job: Any, shard: int, item: Any) -> None:
        tally[_check_artifact_key(prefix, job, shard, item)] += 1

    @settings(max_examples=150, deadline=None)
    @given(st.lists(HOSTILE_TEXT | SAFE_PART, min_size=1, max_size=4), HOSTILE_TEXT | SAFE_PART)
    def bulk_keys(ids: list[str], name: str) -> None:
        tally["bulk " + _check_bulk_ids(ids, name)] += 1

    artifact_keys()
    bulk_keys()
    row.observed = (
        f"artifact keys: {tally['built']} built under their prefix, {tally['refused']} refused; bulk row keys: "
        f"{tally['bulk built']} built, {tally['bulk refused']} refused; 0 unsafe"
    )
