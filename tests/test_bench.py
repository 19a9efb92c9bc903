"""The benchmarks still run (tiny models, one repeat). No timings are asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


def test_patch_apply_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.patch_apply import main

    out = tmp_path / "figures.json"
    (result,) = main(["--family", "svd", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == [result]
    rows = result["patches"]
    assert set(rows) == {"self_attention_multiply", "cross_attention_multiply", "temporal_attention_multiply"}
    assert all(row["changed_parameters"] > 0 for row in rows.values())
    assert "load/(apply+remove)" in capsys.readouterr().out


def test_sag_step_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.sag_step import main

    out = tmp_path / "sag.json"
    result = main(["--latent", "16", "--steps", "2", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["seconds_per_step"]) == {"unpatched", "ours", "diffusers_sag"}
    assert result["max_abs_diff_vs_diffusers"] < 1e-4  # the two SAG implementations agree
    assert "ours / diffusers SAG" in capsys.readouterr().out


def test_bulk_feed_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.bulk_feed import main

    out = tmp_path / "bulk.json"
    result = main(["--embedded", "--rows", "200", "--window", "8", "--batch", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    (row,) = result["results"]
    assert (row["rows"], row["jobs"], row["shards"]) == (200, 1, 20)
    feeding, direct = row["feeding"], row["direct"]
    assert feeding["shards_fed"] == row["shards"] == direct["shards"] == direct["broker_depth"]
    assert 0 < feeding["max_in_flight"] <= 8 and 0 < feeding["max_broker_depth"] <= 8
    assert feeding["feed_calls"] > 1
    assert row["memory"]["submit_peak_mb"] > 0 and row["memory"]["feed_call_peak_kb"] > 0
    assert "feeder / direct rate" in capsys.readouterr().out


def test_bench_entry_point_lists_and_dispatches(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import BENCHES, main

    assert main([]) == 0
    listing = capsys.readouterr().out
    for name in ("patch_apply", "sag_step", "bulk_feed", "celery_overhead", "farm_vs_diffusers"):
        assert name in BENCHES and name in listing
    assert main(["no_such_bench"]) == 2
    assert "unknown benchmark 'no_such_bench'" in capsys.readouterr().err


def _bench_process(tmp_path: Path, *argv: str) -> tuple[dict, str]:
    """Run ``python -m bench ARGV --json`` in its own process (a bench may register its job kind
    or change torch's thread count: neither must leak into this test session)."""
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", *argv, "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_celery_overhead_bench_runs(tmp_path: Path, redis_url: str, pg_database_factory) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()  # this session's db; the bench wants it empty
    argv = ["--broker", "redis", "--tasks", "8", "--repeats", "1", "--warmup", "2", "--redis-url", redis_url]
    result, printed = _bench_process(tmp_path, "celery_overhead", *argv)
    (row,) = result["results"]
    assert row["broker"] == "redis" and row["tasks"] == 8
    assert len(row["bare"]["runs"]) == len(row["farm"]["runs"]) == 1
    assert row["bare"]["tasks_per_s"] > 0 and row["farm"]["shards_per_s"] > 0 and row["farm_over_bare"] > 0
    assert row["farm"]["runs"][0]["retried_shards"] == 0
    breakdown = row["breakdown"]
    assert {"render_shard", "finalize_job", "schedule_job"} <= set(breakdown["tasks"])
    assert breakdown["tasks"]["render_shard"]["count"] == 8
    assert breakdown["in_process"]["per_shard"]["COMMIT"] > 0
    assert "farm / bare" in printed


@pytest.mark.integration
@pytest.mark.slow
def test_farm_vs_diffusers_bench_runs(tmp_path: Path) -> None:
    argv = ["--images", "2", "--shard-size", "1", "--steps", "2", "--repeats", "1", "--threads", "1"]
    result, printed = _bench_process(tmp_path, "farm_vs_diffusers", *argv)
    assert (result["size"], result["farm_mode"], result["device"], result["images"]) == ("tiny", "embedded", "cpu", 2)
    farm, direct = result["farm"], result["direct"]
    assert farm["runs"][0]["shards"] == 2 and farm["images_per_s"] > 0 and direct["images_per_s"] > 0
    assert result["farm_over_direct"] > 0
    assert result["max_pixel_diff"] <= 2  # the same images both ways
    assert "farm / diffusers" in printed


@pytest.mark.integration
def test_pick_bench_runs(tmp_path: Path, pg_database_factory, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.pick import main

    out = tmp_path / "pick.json"
    argv = ["--shards", "2000", "--jobs", "40", "--projects", "5", "--users", "10", "--repeats", "2", "--sqlite"]
    result = main([*argv, "--db-url", pg_database_factory(), "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert [row["backend"] for row in result["results"]] == ["postgres", "sqlite"]
    for row in result["results"]:
        assert row["made"]["pending"] == 2000 and row["made"]["in_flight"] == 8
        for picks in (1, 32):  # the bench checks each feed picked exactly this many
            assert row[f"interactive_{picks}"]["call_ms"] > 0 and row[f"bulk_{picks}"]["call_ms"] > 0
    assert "ms per pick" in capsys.readouterr().out


@pytest.mark.slow
def test_package_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.package import main

    out = tmp_path / "package.json"
    result = main(["--rows", "120", "--shard-size", "50", "--image-side", "8", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    (row,) = result["results"]
    runs = row["runs"]
    assert set(runs) == {"baseline", "webdataset", "again", "parquet"}
    assert runs["baseline"]["rows"] == runs["webdataset"]["rows"] == runs["parquet"]["rows"] == 120
    assert runs["again"]["rows"] == 120 and all(run["peak_kib"] > 0 for run in runs.values())
    assert "time/baseline" in capsys.readouterr().out
