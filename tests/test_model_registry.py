"""The model registry on SeaweedFS, the per-host model cache, and content fingerprints.

Real stores (SeaweedFS as S3), real tiny pipelines, real worker processes for the host-sharing
and kill drills (faults from ``tests/fixtures/faults/sitecustomize.py``: a GET counter and a
SIGKILL mid-download).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from farm.bulk import pinned_rows
from farm.bulk_manifest import read_manifest
from farm.errors import UserError
from farm.file_digests import content_fingerprint, folder_files
from farm.job_spec import SpecError
from farm.model_refs import RegistryError
from farm.model_registry import (
    model_names,
    pin_spec_model,
    push_model,
    remove_version,
    resolve_model_ref,
    versions,
)
from farm.specs import parse_spec
from farm.tiny_models import build_tiny_model
from farm.worker.model_cache import ModelLoadError
from farm.worker.model_store import HostModelStore
from storage.db import make_engine
from storage.models import Artifact, Job
from storage.objects.keys import model_blob_key, model_manifest_key
from tests.fixtures.farm import ROOT, WorkerProcess, text_job

FAULTS = ROOT / "tests" / "fixtures" / "faults"


@pytest.fixture(scope="module")
def twin_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny SD1.5 pipelines with the same file names and sizes but different weights."""
    root = tmp_path_factory.mktemp("twins")
    first, second = root / "a", root / "b"
    build_tiny_model("sd15", first, seed=0)
    build_tiny_model("sd15", second, seed=1)
    return first, second


def _layout(folder: Path) -> list[tuple[str, int]]:
    return [(rel, path.stat().st_size) for rel, path in folder_files(folder)]


def _largest_blob(ref) -> dict:
    return max(ref.manifest["files"], key=lambda f: f["size"])


# -- content fingerprints --------------------------------------------------------------------------
def test_same_names_and_sizes_different_bytes_get_different_hashes_and_both_render(
    twin_models, in_process_worker, tmp_path
) -> None:
    first, second = twin_models
    assert _layout(first) == _layout(second)  # what the old name-and-size fingerprint saw
    assert content_fingerprint(first) != content_fingerprint(second)
    worker = in_process_worker()
    hashes, images = [], []
    for folder in (first, second):
        job_id, outcomes = worker.run(text_job(folder, prompts=["a red cube"], count=1, shard_size=1))
        assert outcomes == ["succeeded"]
        [(params, pixels)] = worker.outputs(job_id)
        hashes.append(params["model_hash"])
        images.append(pixels)
    assert hashes == [content_fingerprint(first), content_fingerprint(second)]
    assert images[0] != images[1]
    # Weights replaced in place (same name, same size) change the fingerprint.
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    before = content_fingerprint(moved)
    weights = moved / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(second / "unet" / "diffusion_pytorch_model.safetensors", weights)
    assert content_fingerprint(moved) != before


# -- the registry ----------------------------------------------------------------------------------
def test_push_list_show_rm_on_s3(twin_models, s3_store) -> None:
    first, second = twin_models
    pushed = push_model(s3_store, first, "tiny")
    assert (pushed.ref.version, pushed.present) == ("1", 0) and pushed.uploaded == len(_layout(first))
    again = push_model(s3_store, first, "tiny")
    assert (again.ref.version, again.uploaded) == ("2", 0)  # every blob was already there
    other = push_model(s3_store, second, "tiny")
    assert 0 < other.uploaded < len(_layout(second))  # configs and tokenizer are shared
    assert model_names(s3_store) == ["tiny"] and versions(s3_store, "tiny") == ["1", "2", "3"]
    assert resolve_model_ref(s3_store, "registry:tiny").digest == other.ref.digest
    assert resolve_model_ref(s3_store, "registry:tiny@1").digest == pushed.ref.digest
    assert resolve_model_ref(s3_store, f"registry:tiny@sha256:{again.ref.digest}").version == "2"
    # Removing version 3 deletes only the blobs no other version lists.
    shared = {f["sha256"] for f in pushed.ref.manifest["files"]}
    only_third = {f["sha256"] for f in other.ref.manifest["files"]} - shared
    _, removed = remove_version(s3_store, "tiny", "3")
    assert removed == len(only_third)
    assert all(s3_store.exists(model_blob_key(d)) for d in shared)
    assert not any(s3_store.exists(model_blob_key(d)) for d in only_third)
    remove_version(s3_store, "tiny", "1")
    assert all(s3_store.exists(model_blob_key(d)) for d in shared)  # version 2 still lists them
    with pytest.raises(RegistryError, match="no version 1"):
        resolve_model_ref(s3_store, "registry:tiny@1")


def test_submit_pins_the_manifest_and_refuses_bad_refs(twin_models, local_store) -> None:
    first, _ = twin_models
    ref = push_model(local_store, first, "tiny").ref
    spec = parse_spec(text_job("registry:tiny"))
    assert pin_spec_model(spec, local_store).model == f"registry:tiny@sha256:{ref.digest}"
    problems = {
        "registry:nothing": "no model 'nothing' in the registry",
        "registry:tiny@7": "no version 7",
        f"registry:tiny@sha256:{'0' * 64}": "no manifest",
    }
    for model, reason in problems.items():
        with pytest.raises(SpecError, match=reason) as caught:
            pin_spec_model(parse_spec(text_job(model)), local_store)
        assert caught.value.problems[0][0] == "model"
    with pytest.raises(SpecError, match="is a sd15 model, but the job's family is sdxl"):
        pin_spec_model(parse_spec(text_job("registry:tiny", family="sdxl")), local_store)
    for bad in ("registry:", "registry:a/b", "registry:tiny@sha256:xyz", "registry:tiny@v1"):
        with pytest.raises(SpecError, match="model: ") as caught:
            parse_spec(text_job(bad))
        assert caught.value.problems[0][0] == "model"


def test_bulk_rows_naming_registry_models_are_pinned(twin_models, local_store) -> None:
    first, second = twin_models
    one = push_model(local_store, first, "tiny").ref
    two = push_model(local_store, second, "tiny").ref
    base = {**text_job("registry:tiny"), "seeds": [1]}
    base.pop("base_seed"), base.pop("count")
    rows = read_manifest(
        b'{"id": "a", "seed": 1, "prompt": "p", "model": "registry:tiny@1"}\n{"id": "b", "seed": 2, "prompt": "q"}\n',
        "rows.jsonl",
    )
    assert [row.overrides for row in pinned_rows(base, rows, local_store)] == [{"model": one.pinned}, {}]
    assert two.version == "2"
    missing = read_manifest(b'{"id": "c", "seed": 3, "prompt": "p", "model": "registry:tiny@9"}\n', "rows.jsonl")
    with pytest.raises(UserError, match=r"row c \(line 1\): invalid job spec: model: model 'tiny' has no version 9"):
        pinned_rows(base, missing, local_store)


# -- the per-host cache ----------------------------------------------------------------------------
def test_flipped_byte_is_caught_and_never_loaded(twin_models, s3_store, tmp_path) -> None:
    first, _ = twin_models
    ref = push_model(s3_store, first, "tiny").ref
    blob = _largest_blob(ref)
    key = model_blob_key(blob["sha256"])
    data = bytearray(s3_store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    s3_store.put_bytes(key, bytes(data))
    host = HostModelStore(s3_store, tmp_path / "cache", 1 << 30)
    with pytest.raises(ModelLoadError, match=f"sha256:{blob['sha256']}.*does not match its digest after 2 downloads"):
        host.materialise(ref.digest)
    assert not (host.blobs / blob["sha256"]).exists() and host.cached() == []
    assert not list(host.blobs.glob(".partial-*"))
    # A byte flipped in the host's own copy is caught before use and fetched again.
    s3_store.put_file(key, first / blob["path"])
    folder = host.materialise(ref.digest)
    cached = host.blobs / blob["sha256"]
    stored = bytearray(cached.read_bytes())
    stored[10] ^= 0x01
    cached.write_bytes(bytes(stored))
    fresh = HostModelStore(s3_store, tmp_path / "cache", 1 << 30)  # another process: nothing remembered
    assert fresh.materialise(ref.digest) == folder and fresh.downloads == 1
    assert content_fingerprint(folder) == content_fingerprint(first)


def test_eviction_under_a_small_budget_keeps_models_in_use(twin_models, local_store, tmp_path) -> None:
    first, second = twin_models
    a = push_model(local_store, first, "a").ref
    b = push_model(local_store, second, "b").ref
    budget = max(a.size, b.size) + 1000  # one model fits, two do not
    host = HostModelStore(local_store, tmp_path / "cache", budget)
    host.materialise(a.digest)  # pinned: this process uses it
    host.materialise(b.digest)
    assert host.cached() == [a.digest, b.digest]  # over the budget, but a is in use
    host.release(a.digest)
    host.materialise(b.digest)
    assert host.cached() == [b.digest] and host.disk_bytes() <= budget
    neighbour = HostModelStore(local_store, tmp_path / "cache", budget)  # another worker on the host
    neighbour.materialise(a.digest)
    assert host.cached() == [b.digest, a.digest]  # b is still pinned by the first one
    local_store.delete(model_manifest_key(b.digest))  # the store loses it: this host's copy serves
    assert host.materialise(b.digest) == tmp_path / "cache" / "manifests" / b.digest
    host.release(b.digest)
    assert neighbour.evict() == [b.digest] and neighbour.cached() == [a.digest]


def _models(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``farm models ARGS`` as a user runs it, through a pipe on a narrow terminal."""
    cmd = [sys.executable, "-m", "farm", "models", *args]
    return subprocess.run(cmd, env={**env, "COLUMNS": "60"}, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _prefetch(env: dict[str, str], *names: str) -> subprocess.CompletedProcess:
    return _models(env, "prefetch", *names)


def test_cli_push_list_show_rm(twin_models, farm_factory) -> None:
    first, _ = twin_models
    farm = farm_factory()
    env = farm.env
    pushed = _models(env, "push", str(first), "--name", "tiny")
    assert pushed.returncode == 0, pushed.stderr
    with farm.client() as client:
        digest = push_model(client.store, first, "tiny").ref.digest  # version 2
    assert "pushed tiny@1 (sd15, 13 files" in pushed.stdout and "blobs: 13 uploaded" in pushed.stdout
    assert "registry:tiny@sha256:" in pushed.stdout
    listed = _models(env, "list")
    assert "tiny: versions 1, 2; latest 2 (sd15, " in listed.stdout and digest[:12] in listed.stdout
    shown = _models(env, "show", "tiny@2")
    assert f"manifest: sha256:{digest}" in shown.stdout and "unet/diffusion_pytorch_model.safetensors" in shown.stdout
    refused = _models(env, "rm", "tiny")
    assert refused.returncode == 2 and "name the version to remove, NAME@VERSION" in refused.stderr
    removed = _models(env, "rm", "tiny@1")
    assert "removed tiny@1" in removed.stdout and "0 unshared blobs deleted" in removed.stdout
    missing = _models(env, "show", "tiny@1")
    assert missing.returncode == 2 and "model 'tiny' has no version 1" in missing.stderr


def test_two_processes_on_one_host_fetch_each_blob_once(twin_models, farm_factory, tmp_path) -> None:
    first, _ = twin_models
    farm = farm_factory()
    with farm.client() as client:
        ref = push_model(client.store, first, "tiny").ref
    gets = tmp_path / "gets.txt"
    env = {
        **farm.env,
        "PYTHONPATH": f"{FAULTS}:{ROOT}",
        "FARM_WORKER__MODEL_DIR": str(tmp_path / "host-cache"),
        "FARM_TEST_COUNT_GETS": str(gets),
        "FARM_TEST_GET_DELAY_S": "0.2",  # 13 blobs: both processes are surely there while they download
    }
    cmd = [sys.executable, "-m", "farm", "models", "prefetch", "tiny"]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    fetched = sorted(line.split()[0] for line in gets.read_text().splitlines())
    assert fetched == sorted(model_blob_key(f["sha256"]) for f in ref.manifest["files"])
    assert sorted("13 blobs downloaded" in out for out in outputs) == [False, True], outputs


def test_killed_download_leaves_nothing_trusted_then_resumes(twin_models, farm_factory, tmp_path) -> None:
    first, _ = twin_models
    farm = farm_factory()
    with farm.client() as client:
        ref = push_model(client.store, first, "tiny").ref
    blob = _largest_blob(ref)
    gets = tmp_path / "gets.txt"
    cache = tmp_path / "host-cache"
    env = {
        **farm.env,
        "PYTHONPATH": f"{FAULTS}:{ROOT}",
        "FARM_WORKER__MODEL_DIR": str(cache),
        "FARM_TEST_COUNT_GETS": str(gets),
        "FARM_TEST_KILL_AFTER_BYTES": str(blob["size"] // 2),
    }
    killed = _prefetch(env, "tiny")
    assert killed.returncode == -9, killed.stderr
    with farm.client() as client:
        host = HostModelStore(client.store, cache, 1 << 30)
    assert not (host.blobs / blob["sha256"]).exists() and host.cached() == []
    partial = host.blobs / f".partial-{blob['sha256']}"
    assert 0 < partial.stat().st_size < blob["size"]
    env.pop("FARM_TEST_KILL_AFTER_BYTES")
    done = _prefetch(env, "tiny@1")
    assert done.returncode == 0, done.stderr
    resumed = [line for line in gets.read_text().splitlines() if line.startswith(model_blob_key(blob["sha256"]))]
    assert len(resumed) == 2 and int(resumed[1].split()[1]) > 0  # the second GET was a ranged one
    assert content_fingerprint(cache / "manifests" / ref.digest) == content_fingerprint(first)


@pytest.mark.integration
def test_two_workers_on_one_host_download_each_blob_once(
    twin_models, farm_factory, pg_url, redis_url, seaweedfs, tmp_path
) -> None:
    first, second = twin_models
    farm = farm_factory(broker=redis_url, db_url=pg_url, s3=seaweedfs)
    gets = tmp_path / "gets.txt"
    with farm.client() as client:
        ref = push_model(client.store, first, "tiny").ref
        env = {
            "PYTHONPATH": f"{FAULTS}:{ROOT}",
            "FARM_WORKER__MODEL_DIR": str(tmp_path / "host-cache"),
            "FARM_TEST_COUNT_GETS": str(gets),
            "FARM_TEST_GET_DELAY_S": "0.1",  # downloads long enough for the second worker to arrive
        }
        queues = ["farm.control", "farm.gpu.sd15"]
        starting = [WorkerProcess({**farm.env, **env}, queues, f"w{i}", tmp_path / f"w{i}.log") for i in range(2)]
        farm.workers.extend(starting)
        for worker in starting:  # started together, so both meet the model not yet cached
            worker.wait_ready()
        job_id = client.submit(
            text_job("registry:tiny", prompts=["a red cube", "a blue sphere"], count=1, shard_size=1)
        )
        push_model(client.store, second, "tiny")  # a newer version: the submitted job keeps its bytes
        summary = client.wait(job_id, timeout=180)
    assert summary["status"] == "succeeded", summary
    blob_gets = [line.split()[0] for line in gets.read_text().splitlines() if "/blobs/" in line]
    assert sorted(blob_gets) == sorted(model_blob_key(f["sha256"]) for f in ref.manifest["files"])
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            spec = conn.scalar(select(Job.spec).where(Job.id == job_id))
            hashes = set(conn.scalars(select(Artifact.model_hash).where(Artifact.job_id == job_id)))
    finally:
        engine.dispose()
    assert spec["model"] == ref.pinned and hashes == {ref.digest}


def test_push_refuses_what_is_not_a_model(tmp_path, local_store) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"model_index\.json"):
        push_model(local_store, tmp_path / "empty", "x")
    with pytest.raises(UserError, match="name"):
        push_model(local_store, tmp_path / "empty", "../x", family="sd15")


# -- single-file checkpoints -----------------------------------------------------------------------
def test_import_a_single_file_checkpoint_offline(twin_models, local_store, tmp_path, monkeypatch) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from farm.worker.single_file import convert_single_file
    from tests.fixtures.single_file import original_state_dict

    first, _ = twin_models
    checkpoint = tmp_path / "tiny-sd15.safetensors"
    save_file(original_state_dict(first), checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = convert_single_file(checkpoint, "sd15", first, tmp_path / "converted")
    ref = push_model(local_store, folder, "imported").ref
    assert ref.family == "sd15" and resolve_model_ref(local_store, "registry:imported").digest == ref.digest
    host = HostModelStore(local_store, tmp_path / "cache", 1 << 30)
    materialised = host.materialise(ref.digest)
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        imported, original = load_file(materialised / weights), load_file(first / weights)
        assert imported.keys() == original.keys()
        assert all(torch.equal(imported[k], original[k]) for k in original)
    with pytest.raises(UserError, match="not a StableDiffusionXLPipeline"):
        convert_single_file(checkpoint, "sdxl", first, tmp_path / "wrong")
    with pytest.raises(UserError, match="pickled"):
        convert_single_file(tmp_path / "model.ckpt", "sd15", first, tmp_path / "wrong")
