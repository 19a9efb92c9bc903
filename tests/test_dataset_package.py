"""Bulk renders packaged as datasets (farm/datasets): WebDataset shards read back with the
``webdataset`` library, Parquet with pyarrow and ``datasets.load_dataset`` offline, plain files;
incremental packaging, failed rows in the stats and never in a shard, an interrupted run's shard
written again, the store as the output (multipart on SeaweedFS), the CLI.

Rows are written into a real SQLite database and local store the way workers record them
(bench/package.py's ``fabricate_bulk``); the 200-row render on the tiny model with real workers
is in tests/test_dataset_jobs.py."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.package import fabricate_bulk
from farm.datasets.package import package_bulk
from farm.errors import InvalidKey, UserError
from storage import migrate
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, BulkJob, Job
from storage.objects import LocalStore

wds = pytest.importorskip("webdataset")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def farm_db(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine), LocalStore(tmp_path / "objects")
    engine.dispose()


def database_rows(factory, name: str) -> dict[str, Artifact]:
    with session_scope(factory) as s:
        artifacts = s.scalars(
            select(Artifact)
            .join(Job, Job.id == Artifact.job_id)
            .join(BulkJob, BulkJob.id == Job.bulk_id)
            .where(BulkJob.name == name)
        ).all()
        s.expunge_all()
    return {a.params["row_id"]: a for a in artifacts}


def read_webdataset(folder: Path) -> list[dict]:
    """Every sample of the package's tar shards, decoded by the webdataset library."""
    manifest = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / shard["name"]) for shard in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))


def check_against_database(samples: list[dict], rows: dict[str, Artifact]) -> None:
    for sample in samples:
        meta = sample["json"]
        a = rows[meta["row_id"]]
        assert sample["__key__"] == a.params["row_id"].replace(".", "%2E")
        assert sample["png"].size == (a.params["width"], a.params["height"])  # the image decodes
        assert sample["txt"] == a.params["prompt"]
        assert (meta["sha256"], meta["seed"], meta["model_hash"]) == (a.sha256, a.seed, a.model_hash)
        assert meta["key"] == a.key
        assert meta["params"] == a.params and meta["prompt"] == a.params["prompt"]
        assert meta["negative_prompt"] == a.params["negative_prompt"] and meta["patches"] == a.params["patches"]


def check_manifest_sha256(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        data = (folder / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    return manifest


def test_webdataset_package_reads_back_and_lists_failed_rows(farm_db, tmp_path: Path) -> None:
    factory, store = farm_db
    fabricate_bulk(factory, store, "night", 200, image_side=16, failed_shards=(1,))  # render shards of 100
    out = tmp_path / "pkg"
    report = package_bulk(factory, store, "night", "webdataset", 30, str(out))
    counts = (report["new_shards"], report["new_rows"], report["packaged"], report["failed"], report["pending"])
    assert counts == (4, 100, 100, 100, 0)
    samples = read_webdataset(out)
    rows = database_rows(factory, "night")
    assert len(samples) == len(rows) == 100 and {s["json"]["row_id"] for s in samples} == set(rows)
    check_against_database(samples, rows)
    manifest = check_manifest_sha256(out)
    failed_ids = {f"r{i:07d}" for i in range(100, 200)}
    assert {row["row_id"] for row in manifest["failed"]} == failed_ids
    assert all("injected fault" in row["reason"] for row in manifest["failed"])
    # The failed rows are in the stats of the shard their ids fall in (after the last rendered
    # row here: they wait in manifest.json) and never in a shard.
    stats = [json.loads((out / s["stats"]).read_text()) for s in manifest["shards"]]
    assert sum(s["successes"] for s in stats) == 100 and all(s["bytes"] > 0 and s["image_bytes"] > 0 for s in stats)
    members = set()
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members.update(tar.getnames())
    assert not any(m.split(".")[0] in failed_ids for m in members)
    card = (out / "README.md").read_text()
    assert "| failed | 100 " in card and "/models/sd15" in card and "`model_hash`" in card


def test_failed_rows_between_rendered_ones_go_into_that_shards_stats(farm_db, tmp_path: Path) -> None:
    factory, store = farm_db
    fabricate_bulk(factory, store, "gaps", 300, image_side=8, failed_shards=(1,))  # rows 100..199 failed
    store.delete(next(a.key for a in database_rows(factory, "gaps").values() if a.params["row_id"] == "r0000250"))
    out = tmp_path / "pkg"
    package_bulk(factory, store, "gaps", "webdataset", 150, str(out))
    manifest = check_manifest_sha256(out)
    first, second = (json.loads((out / s["stats"]).read_text()) for s in manifest["shards"])
    assert (first["successes"], first["failures"]) == (150, 100)  # rows 0..99, 200..249 and the failed 100..199
    assert {r["row_id"] for r in first["failed_rows"]} == {f"r{i:07d}" for i in range(100, 200)}
    assert second["successes"] == 49 and second["failed_rows"] == [
        {"row_id": "r0000250", "key": "datasets/gaps/r0000250.png", "reason": "image missing from the store"}
    ]
    assert manifest["rows"]["failed"] == 101 and "r0000250" not in manifest["shards"][1]["row_ids"]


def test_packaging_again_adds_only_new_shards(farm_db, tmp_path: Path) -> None:
    factory, store = farm_db
    fabricate_bulk(factory, store, "nightly", 100, image_side=8)
    out = tmp_path / "pkg"
    first = package_bulk(factory, store, "nightly", "webdataset", 40, str(out))
    assert (first["new_shards"], first["new_rows"]) == (3, 100)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    again = package_bulk(factory, store, "nightly", "webdataset", 40, str(out))
    assert (again["new_shards"], again["new_rows"], again["packaged"]) == (0, 0, 100)
    fabricate_bulk(factory, store, "nightly", 150, image_side=8)  # the next night: 50 more rows
    night2 = package_bulk(factory, store, "nightly", "webdataset", 40, str(out))
    assert (night2["new_shards"], night2["new_rows"], night2["packaged"], night2["shards"]) == (2, 50, 150, 5)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar") if p.name in before} == before
    manifest = check_manifest_sha256(out)
    assert [s["row_ids"][0] for s in manifest["shards"][3:]] == ["r0000100", "r0000140"]
    assert len(manifest["runs"]) == 3 and manifest["runs"][2]["shards"] == ["00003.tar", "00004.tar"]
    samples = read_webdataset(out)
    assert sorted(s["json"]["row_id"] for s in samples) == [f"r{i:07d}" for i in range(150)]


def test_a_shard_an_interrupted_run_wrote_but_never_listed_is_written_again(farm_db, tmp_path: Path) -> None:
    factory, store = farm_db
    fabricate_bulk(factory, store, "killed", 90, image_side=8)
    out = tmp_path / "pkg"

    def die_after_the_second(entry: dict) -> None:
        if entry["name"] == "00001.tar":
            raise KeyboardInterrupt  # as a kill between a shard's commit and the manifest's write

    with pytest.raises(KeyboardInterrupt):
        package_bulk(factory, store, "killed", "webdataset", 30, str(out), on_shard=die_after_the_second)
    listed = [s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    assert listed == ["00000.tar"] and (out / "00001.tar").exists()  # the second: committed, not listed
    shard0 = (out / "00000.tar").stat().st_mtime_ns
    (out / "00001.tar").write_bytes(b"half a tar")  # as if it had been cut short
    (out / ".tmp-leftover").mkdir()  # a scratch folder of a killed writer
    resumed = package_bulk(factory, store, "killed", "webdataset", 30, str(out))
    assert (resumed["removed_unlisted"], resumed["new_shards"], resumed["packaged"]) == (2, 2, 90)
    assert (out / "00000.tar").stat().st_mtime_ns == shard0
    assert not (out / ".tmp-leftover").exists()
    check_manifest_sha256(out)
    assert len(read_webdataset(out)) == 90


def test_parquet_package_reads_with_pyarrow_and_datasets(farm_db, tmp_path: Path, monkeypatch) -> None:
    factory, store = farm_db
    fabricate_bulk(factory, store, "pq", 130, image_side=16, failed_shards=(1,))
    out = tmp_path / "pkg"
    report = package_bulk(factory, store, "pq", "parquet", 64, str(out))
    assert (report["new_shards"], report["packaged"], report["failed"]) == (2, 100, 30)
    check_manifest_sha256(out)
    table = pq.read_table(out / "00000.parquet")
    rows = database_rows(factory, "pq")
    both = pq.ParquetDataset([str(p) for p in sorted(out.glob("*.parquet"))]).read()
    assert table.num_rows == 64 and both.num_rows == 100
    for record in both.to_pylist():
        a = rows[record["row_id"]]
        assert hashlib.sha256(record["image"]["bytes"]).hexdigest() == a.sha256 == record["sha256"]
        assert (record["seed"], record["model_hash"], record["prompt"]) == (a.seed, a.model_hash, a.params["prompt"])
        assert json.loads(record["params"]) == a.params
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(
        "parquet", data_files=str(out / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert ds.num_rows == 100 and ds.features["image"].__class__.__name__ == "Image"
    first = ds[0]
    assert first["image"].size == (16, 16) and first["row_id"] == "r0000000"
    assert first["sha256"] == rows["r0000000"].sha256


def test_files_package_and_its_checksums(farm_db, tmp_path: Path) -> None:
    factory, store = farm_db
    fabricate_bulk(factory, store, "files", 25, image_side=8)
    out = tmp_path / "pkg"
    package_bulk(factory, store, "files", "files", 10, str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["00000", "00001", "00002"]
    rows = database_rows(factory, "files")
    for shard in manifest["shards"]:
        folder = out / shard["name"]
        sums = (folder / "SHA256SUMS").read_bytes()
        assert hashlib.sha256(sums).hexdigest() == shard["sha256"]
        for line in sums.decode().splitlines():
            digest, name = line.split("  ")
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        for row_id in shard["row_ids"]:
            assert (folder / f"{row_id}.png").read_bytes() == store.get_bytes(rows[row_id].key)
            assert json.loads((folder / f"{row_id}.json").read_text())["params"] == rows[row_id].params


def test_refusals_name_the_option(farm_db, tmp_path: Path) -> None:
    factory, store = farm_db
    fabricate_bulk(factory, store, "x", 5, image_side=8)
    with pytest.raises(UserError, match="--format: 'tfrecord' is not one of webdataset, parquet, files"):
        package_bulk(factory, store, "x", "tfrecord", 10, str(tmp_path / "a"))
    with pytest.raises(UserError, match=r"--shard-size: 0 is outside"):
        package_bulk(factory, store, "x", "webdataset", 0, str(tmp_path / "a"))
    with pytest.raises(InvalidKey, match="--out store key"):
        package_bulk(factory, store, "x", "webdataset", 10, "store:inputs/x")
    package_bulk(factory, store, "x", "webdataset", 10, str(tmp_path / "a"))
    with pytest.raises(UserError, match="holds the webdataset package of bulk job 'x'; give another --out"):
        package_bulk(factory, store, "x", "parquet", 10, str(tmp_path / "a"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "00000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(UserError, match="is not empty and holds no package"):
        package_bulk(factory, store, "x", "webdataset", 10, str(tmp_path / "theirs"))
    assert (tmp_path / "theirs" / "00000.tar").read_bytes() == b"someone else's shard"
    assert isinstance(UserError("x"), ValueError)


@pytest.mark.integration
def test_package_into_the_bucket_in_multipart_uploads(farm_db, seaweedfs, tmp_path: Path) -> None:
    from tests.fixtures.seaweed import make_s3_store

    factory, _ = farm_db
    s3 = make_s3_store(seaweedfs, prefix="farm", multipart_threshold=5 << 20, multipart_chunk=5 << 20)
    fabricate_bulk(factory, s3, "big", 100, image_side=160, distinct_images=100)  # ~77 KB each
    report = package_bulk(factory, s3, "big", "webdataset", 80, "store:packages/big")
    assert (report["new_shards"], report["packaged"]) == (2, 100) and report["out"].startswith("store:packages/big")
    manifest = json.loads(s3.get_bytes("packages/big/manifest.json"))
    first = manifest["shards"][0]
    assert first["bytes"] > 5 << 20
    head = s3.head("packages/big/00000.tar")
    assert head.size == first["bytes"] and head.sha256 == first["sha256"]
    assert head.etag.strip('"').endswith("-2")  # two parts: over the 5 MiB threshold
    data = s3.get_bytes("packages/big/00000.tar")
    assert hashlib.sha256(data).hexdigest() == first["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert len(tar.getnames()) == 3 * 80
    assert "README.md" in {info.key.rsplit("/", 1)[-1] for info in s3.list("packages/big")}
    again = package_bulk(factory, s3, "big", "webdataset", 80, "store:packages/big")
    assert (again["new_shards"], again["removed_unlisted"]) == (0, 0)


def test_cli_package_prints_what_it_did(farm_factory, tmp_path: Path) -> None:
    from tests.test_operations import _farm_cli

    farm = farm_factory(COLUMNS="60")
    cfg = farm.settings()
    engine = make_engine(cfg.database_url)
    from storage.objects import open_store

    store = open_store(cfg.storage, cfg.data_dir)
    fabricate_bulk(make_session_factory(engine), store, "cli-night", 45, image_side=8, failed_shards=(0,))
    fabricate_bulk(make_session_factory(engine), store, "cli-night", 145, image_side=8)
    engine.dispose()
    result = _farm_cli(farm, "bulk", "package", "cli-night", "--format", "webdataset", "--shard-size", "40")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "00000.tar: 40 sample(s)" in text and "45 failed row(s) in its stats" in text
    assert "3 new shard(s), 100 new row(s); 100 row(s) in 3 shard(s), 45 failed" in text
    assert "store:packages/cli-night/webdataset" in text
    assert store.exists("packages/cli-night/webdataset/00002.tar")
    folder = tmp_path / "local-pkg"
    result = _farm_cli(farm, "bulk", "package", "cli-night", "--format", "parquet", "--out", str(folder))
    assert result.returncode == 0 and (folder / "00000.parquet").exists() and (folder / "README.md").exists()
    bad = _farm_cli(farm, "bulk", "package", "nope", "--format", "webdataset")
    assert bad.returncode != 0 and "no bulk job 'nope'" in " ".join((bad.stdout + bad.stderr).split())


def test_the_nightly_package_step_runs_at_the_window_end(tmp_path: Path) -> None:
    """``bulk.schedules[].package``: a beat entry at ``window_end`` sends ``farm.package_bulk``,
    which extends each package with the rows rendered since (here: two nights)."""
    from pydantic import ValidationError

    from farm.beat import beat_schedule, package_scheduled_bulk
    from farm.settings import FarmSettings
    from farm.worker.resources import WorkerResources

    entry = {"name": "nightly", "base": "b.yaml", "manifest": "m.jsonl", "at": "02:00", "window_end": "06:00",
             "package": [{"format": "webdataset", "shard_size": 20},
                         {"format": "files", "shard_size": 50, "out": str(tmp_path / "files")}]}  # fmt: skip
    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data", bulk={"schedules": [entry]})
    package_entry = beat_schedule(settings)["farm-bulk-nightly-package"]
    assert (package_entry["task"], package_entry["args"], package_entry["schedule"].at) == (
        "farm.package_bulk",
        ["nightly"],
        "06:00",
    )
    with pytest.raises(ValidationError, match="package needs window_end"):
        FarmSettings(_env_file=None, bulk={"schedules": [{**entry, "window_end": None}]})
    migrate.upgrade(settings.database_url)
    res = WorkerResources.create(settings, name="control")
    try:
        fabricate_bulk(res.session_factory, res.store, "nightly", 30, image_side=8)
        first = package_scheduled_bulk(res, "nightly")
        assert [(p["format"], p["new_shards"], p["packaged"]) for p in first["packages"]] == [
            ("webdataset", 2, 30),
            ("files", 1, 30),
        ]
        fabricate_bulk(res.session_factory, res.store, "nightly", 70, image_side=8)  # the next night
        second = package_scheduled_bulk(res, "nightly")
        assert [(p["new_shards"], p["new_rows"], p["shards"]) for p in second["packages"]] == [(2, 40, 4), (1, 40, 2)]
        assert res.store.exists("packages/nightly/webdataset/00003.tar")
    finally:
        res.close()
