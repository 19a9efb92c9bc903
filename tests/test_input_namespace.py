"""Outputs cannot overwrite inputs, and an input overwritten anyway is repaired by the next upload.

Uploaded inputs live under ``inputs/sha256/<digest>.<ext>``; outputs under ``{output_prefix}/...``.
The top-level folders ``inputs`` and ``models`` are the farm's own: a spec (or a bulk manifest)
that would write outputs there is refused at submit with the field and the reason. And because a
content-addressed key does not prove its content, an upload finding the key taken checks the
stored object (size, sha256, the server's MD5) and uploads again when it differs.

Real Postgres, Redis and SeaweedFS; the repair drill runs a real worker process.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from farm.inputs import stored_intact, upload_image_file
from farm.specs import SpecError
from storage.db import make_engine
from storage.models import Artifact, BulkJob, Job, Shard


def _png(colour: tuple[int, int, int], path: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _bucket_keys(s3, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(obj["Key"] for obj in page.get("Contents", ()))
    return keys


def _rows(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            m.__tablename__: conn.scalar(select(func.count()).select_from(m)) for m in (Job, Shard, Artifact, BulkJob)
        }


@pytest.fixture
def s3_client(farm_factory, pg_url, redis_url, seaweedfs):
    """A farm client on Postgres, Redis and a fresh SeaweedFS bucket, and a boto3 client of the test's own."""
    farm = farm_factory(broker=redis_url, db_url=pg_url, s3=seaweedfs)
    with farm.client() as client:
        client.store.ensure_bucket()
        yield farm, client, seaweedfs.boto3_client()


@pytest.mark.integration
def test_bulk_outputs_aimed_at_an_uploaded_input_are_refused(s3_client, pg_url, tmp_path, fault_table) -> None:
    """The issue's case: ``output_prefix: inputs``, bulk name ``sha256``, a row id equal to an
    uploaded image's digest would write ``inputs/sha256/<digest>.png`` over that image."""
    row = fault_table.row(
        "Bad input",
        "bulk outputs aimed at an uploaded input",
        "bulk 'sha256', output_prefix 'inputs', row id = an uploaded PNG's digest (its key: inputs/sha256/<id>.png)",
        "SpecError naming output_prefix at submit; 0 rows; no output object; the input unchanged",
    )
    _, client, s3 = s3_client
    bucket = client.store.bucket
    _png((1, 2, 3), tmp_path / "face.png")
    ref = upload_image_file(client.store, tmp_path / "face.png", "image")
    digest = ref["sha256"]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(f'{{"id": "{digest}", "prompt": "a cat"}}\n')
    base = {
        "model": "/models/sd15",
        "family": "sd15",
        "prompts": ["x"],
        "seeds": [1],
        "steps": 2,
        "width": 64,
        "height": 64,
        "output_prefix": "inputs",
    }
    engine = make_engine(pg_url)
    try:
        rows_before, keys_before = _rows(engine), _bucket_keys(s3, bucket)
        with pytest.raises(SpecError) as info:
            client.submit_bulk("sha256", base, manifest)
        rows_after, keys_after = _rows(engine), _bucket_keys(s3, bucket)
    finally:
        engine.dispose()
    error = info.value
    assert isinstance(error, ValueError) and not error.retryable
    ((field, reason),) = error.problems
    assert field == "output_prefix" and "which the farm keeps for uploaded inputs" in reason, error.problems
    assert rows_after == rows_before
    assert hashlib.sha256(client.store.get_bytes(ref["key"])).hexdigest() == digest, "the input was overwritten"
    added = sorted(keys_after - keys_before)
    assert added == [], "a refused bulk stores nothing, not even its manifest"
    row.observed = (
        f"SpecError: {field}: {reason[:170]}; rows added: 0; input {ref['key'][:24]}... unchanged; "
        f"objects added: {len(added)} ({', '.join(k.rsplit('/', 1)[0] + '/...' for k in added) or 'none'})"
    )


@pytest.mark.integration
def test_a_refused_bulk_stores_no_manifest(s3_client, tmp_path) -> None:
    _, client, s3 = s3_client
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text('{"id": "r1"}\n')
    base = {"model": "/m", "family": "sd15", "prompts": ["x"], "seeds": [1], "output_prefix": "models"}
    before = _bucket_keys(s3, client.store.bucket)
    with pytest.raises(SpecError):
        client.submit_bulk(f"n{uuid.uuid4().hex[:8]}", base, manifest)
    assert _bucket_keys(s3, client.store.bucket) == before


@pytest.mark.integration
def test_an_overwritten_input_is_not_taken_as_intact(s3_client, tmp_path) -> None:
    """Each way the key can hold other bytes is seen: rewritten by the farm (its sha256 metadata
    follows the new bytes), by another tool (no metadata), or with forged metadata (only the
    server's MD5 differs)."""
    _, client, s3 = s3_client
    store, bucket = client.store, client.store.bucket
    good = _png((10, 20, 30), tmp_path / "in.png")
    ref = upload_image_file(store, tmp_path / "in.png", "image")
    digest, key = ref["sha256"], ref["key"]
    assert stored_intact(store.head(key), good, digest)
    other = _png((200, 20, 30))
    full = store._full(key)
    for rewrite in (
        lambda: store.put_bytes(key, other),
        lambda: s3.put_object(Bucket=bucket, Key=full, Body=other),
        lambda: s3.put_object(Bucket=bucket, Key=full, Body=other, Metadata={"sha256": digest}),
        lambda: s3.put_object(Bucket=bucket, Key=full, Body=good[:-1] + b"\0", Metadata={"sha256": digest}),
    ):
        rewrite()
        assert not stored_intact(store.head(key), good, digest)
        assert upload_image_file(store, tmp_path / "in.png", "image") == ref
        assert store.get_bytes(key) == good and stored_intact(store.head(key), good, digest)


@pytest.mark.integration
@pytest.mark.slow
def test_a_corrupted_input_is_repaired_by_the_next_upload(s3_client, tiny_models, tmp_path, fault_table) -> None:
    row = fault_table.row(
        "Resource faults",
        "an uploaded input overwritten in the store",
        "inputs/sha256/<digest>.png replaced with another PNG (metadata forged to the old digest), then "
        "a job referencing it, then the same image submitted again",
        "the job referencing it fails its sha256 check; the next upload sees the damage and repairs it; "
        "that job renders",
    )
    farm, client, s3 = s3_client
    farm.start_worker(["farm.control"], name="control")
    farm.start_worker(["farm.gpu.svd"], name="svd")
    image = tmp_path / "start.png"
    good = _png((90, 160, 60), image)
    ref = upload_image_file(client.store, image, "images[0]")
    s3.put_object(
        Bucket=client.store.bucket,
        Key=client.store._full(ref["key"]),
        Body=_png((160, 60, 90)),
        Metadata={"sha256": ref["sha256"]},
    )
    spec = {
        "kind": "temporal_video",
        "model": str(tiny_models["svd"]),
        "family": "svd",
        "seeds": [5],
        "num_frames": 2,
        "segments": 1,
        "steps": 2,
        "width": 64,
        "height": 64,
        "fps": 6,
        "output_prefix": "namespace",
    }
    broken = client.submit({**spec, "images": [ref]})
    broken_summary = client.wait(broken, timeout=300)
    (shard,) = broken_summary["shards"]
    assert broken_summary["status"] == "failed" and "does not match its sha256" in shard["error"], shard
    repaired = client.submit({**spec, "images": [{"path": str(image)}]})
    assert client.store.get_bytes(ref["key"]) == good, "the upload did not repair the input"
    summary = client.wait(repaired, timeout=300)
    assert summary["status"] == "succeeded", summary
    keys = [r["key"] for r in client.results(repaired)]
    assert keys and all(key.startswith(f"namespace/{repaired}/") for key in keys), keys
    row.observed = (
        f"the job on the damaged input failed at attempt {shard['attempts']}: "
        f"{shard['error'].replace(ref['key'], 'inputs/sha256/<digest>.png')[:110]}; "
        f"submitting the image again re-uploaded it ({len(good)} bytes, sha256 matches again) and that job "
        f"succeeded with {len(keys)} outputs under namespace/{{job}}/"
    )
