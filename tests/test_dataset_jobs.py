"""A bulk render on the tiny model with real workers (Redis + Postgres), packaged with
``farm bulk package``: as WebDataset (read back with the ``webdataset`` library, every sample
decodes and its metadata equals the database) while one render shard has failed (its rows in the
stats, never in a shard), then again after the failed rows were retried (only a new shard), and
as Parquet (pyarrow and ``datasets.load_dataset`` offline).

24 rows, not the issue's 200: a tiny-model image takes 0.5-3 s on a shared 2-core CI host. The
200-row packaging (same code, rows written as workers record them) is in
tests/test_dataset_package.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from farm.datasets.package import package_bulk
from storage.db import make_engine, make_session_factory
from tests.fixtures.services import wait_for
from tests.test_bulk_jobs import _base, _manifest
from tests.test_dataset_package import check_against_database, check_manifest_sha256, database_rows, read_webdataset
from tests.test_operations import _farm_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

ROWS = 24


def test_a_bulk_run_packaged_as_webdataset_then_parquet(
    farm_factory, tiny_models, pg_url, redis_url, tmp_path: Path, monkeypatch
) -> None:
    farm = farm_factory(broker=redis_url, db_url=pg_url, FARM_SCHEDULING__WINDOW_PER_QUEUE="8", COLUMNS="60")
    broken = farm.start_worker(["farm.control", "farm.gpu.sd15"], name="pkg-broken", FARM_WORKER__FAIL_SHARDS="[2]")
    name = "packaged"
    manifest = _manifest(tmp_path / "rows.jsonl", range(ROWS))
    base = _base(tiny_models["sd15"], tmp_path, shard_size=4)  # render shard 2 = rows 8..11
    assert _farm_cli(farm, "bulk", "submit", str(manifest), "--base", str(base), "--name", name).returncode == 0
    with farm.client() as client:
        wait_for(lambda: client.bulk_status(name)["remaining"] == 0, 300, "every row rendered or failed")
        assert (client.bulk_status(name)["done"], client.bulk_status(name)["failed"]) == (20, 4)

    wds_out = tmp_path / "wds"
    packaged = _farm_cli(
        farm, "bulk", "package", name, "--format", "webdataset", "--shard-size", "8", "--out", str(wds_out)
    )
    assert packaged.returncode == 0, packaged.stderr
    assert "3 new shard(s), 20 new row(s)" in " ".join(packaged.stdout.split())
    first = check_manifest_sha256(wds_out)
    failed_ids = {f"row{i:05d}" for i in range(8, 12)}
    assert {r["row_id"] for r in first["failed"]} == failed_ids
    assert all("injected fault" in r["reason"] for r in first["failed"])
    stats1 = json.loads((wds_out / "00001_stats.json").read_text())  # rows 12..19 and the failed 8..11
    assert {r["row_id"] for r in stats1["failed_rows"]} == failed_ids and stats1["successes"] == 8
    assert not failed_ids & {row for shard in first["shards"] for row in shard["row_ids"]}
    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    samples = read_webdataset(wds_out)
    in_db = database_rows(factory, name)
    assert len(samples) == len(in_db) == 20
    check_against_database(samples, in_db)

    # The failed rows are rendered again by a healthy worker; packaging again adds one shard.
    broken.stop()
    farm.start_worker(["farm.control", "farm.gpu.sd15"], name="pkg-healthy")
    assert _farm_cli(farm, "bulk", "retry", name).returncode == 0
    with farm.client() as client:
        wait_for(lambda: client.bulk_status(name)["done"] == ROWS, 120, "the retried rows")
    before = {s["name"]: (wds_out / s["name"]).read_bytes() for s in first["shards"]}
    again = _farm_cli(
        farm, "bulk", "package", name, "--format", "webdataset", "--shard-size", "8", "--out", str(wds_out)
    )
    assert "1 new shard(s), 4 new row(s); 24 row(s) in 4 shard(s), 0 failed" in " ".join(again.stdout.split())
    second = check_manifest_sha256(wds_out)
    assert second["shards"][:3] == first["shards"] and set(second["shards"][3]["row_ids"]) == failed_ids
    assert {name: (wds_out / name).read_bytes() for name in before} == before
    in_db = database_rows(factory, name)
    samples = read_webdataset(wds_out)
    assert len(samples) == ROWS
    check_against_database(samples, in_db)

    pq_out = tmp_path / "parquet"
    with farm.client() as client:
        report = package_bulk(client.sessions, client.store, name, "parquet", 1000, str(pq_out))
    assert (report["new_shards"], report["packaged"]) == (1, ROWS)
    table = pq.read_table(pq_out / "00000.parquet")
    assert table.num_rows == ROWS
    for record in table.to_pylist():
        a = in_db[record["row_id"]]
        assert hashlib.sha256(record["image"]["bytes"]).hexdigest() == a.sha256
        assert json.loads(record["params"]) == a.params and record["model_hash"] == a.model_hash
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = datasets.load_dataset(
        "parquet", data_files=str(pq_out / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert ds.num_rows == ROWS and ds[0]["image"].size == (64, 64) and ds[0]["seed"] == in_db[ds[0]["row_id"]].seed
    engine.dispose()
