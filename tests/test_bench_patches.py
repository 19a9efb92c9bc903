"""The patch benchmarks and bench.gpu still run (tiny models, one repeat). No timings are asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_patch_apply_switches_every_patch_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.patch_apply import ADAPTERS, MULTIPLIERS, PATCH_KINDS, main

    out = tmp_path / "apply.json"
    (result,) = main(["--family", "sd15", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == [result]
    rows = result["patches"]
    assert set(rows) == set(PATCH_KINDS)
    for name in MULTIPLIERS:
        assert rows[name]["changed_parameters"] > 0 and rows[name]["replaced_processors"] == 0
    for name in ADAPTERS:  # every cross-attention of the tiny SD1.5 UNet, adapter loads measured
        assert rows[name]["replaced_processors"] == 4 and rows[name]["changed_parameters"] == 0
        assert rows[name]["component_load_s"] > 0 and "load_with_component_over_switch" in rows[name]
    assert rows["sag"]["replaced_processors"] == 1
    for row in rows.values():
        assert row["switch_s"] == pytest.approx(row["build_s"] + row["apply_s"] + row["remove_s"])
    assert "(load+adapter)/switch" in capsys.readouterr().out


def test_patch_apply_skips_unet2d_patches_on_svd(tmp_path: Path) -> None:
    from bench.patch_apply import main

    (result,) = main(["--family", "svd", "--repeats", "1", "--patches", "temporal_attention_multiply", "sag"])
    assert set(result["patches"]) == {"temporal_attention_multiply"}


def test_model_cache_mix_routed_vs_unrouted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.model_cache_mix import SETUPS, main

    out = tmp_path / "mix.json"
    result = main(["--models", "1", "--jobs", "8", "--shards", "2", "--capacity", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["shards"] == 16 == sum(result["shards_per_family"].values())
    setups = result["setups"]
    assert set(setups) == set(SETUPS)
    for row in setups.values():
        assert row["hits"] + row["loads"] == result["shards"]
        assert row["loads"] >= result["distinct_models_used"] and 0 <= row["hit_rate"] <= 1
    routed = setups["routed"]
    assert set(routed["workers"]) <= {"farm.gpu.sd15", "farm.gpu.sdxl", "farm.gpu.svd"}
    assert routed["loads"] == result["distinct_models_used"] and routed["evictions"] == 0  # one model per queue
    assert len(setups["unrouted"]["workers"]) == 1
    assert "hit rate" in capsys.readouterr().out


def test_patch_overhead_ours_vs_native_ip_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.patch_overhead import VARIANTS, main

    out = tmp_path / "overhead.json"
    (result,) = main(["--family", "sd15", "--latent", "16", "--steps", "1", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == [result]
    assert tuple(result["variants"]) == VARIANTS["sd15"]
    assert result["unpatched_restored_exactly"] and result["finite"]
    assert set(result["ours_vs_native"]) == {"ip_adapter", "ip_adapter_plus"}
    for row in result["ours_vs_native"].values():
        assert row["ours_over_native"] > 0
        assert row["max_abs_diff"] < 1e-4 * row["max_abs_change_vs_unpatched"]  # the two agree
    assert "ours / diffusers native" in capsys.readouterr().out


def test_patch_overhead_svd(tmp_path: Path) -> None:
    from bench.patch_overhead import main

    args = ["--family", "svd", "--latent", "8", "--frames", "2", "--steps", "1", "--repeats", "1"]
    (result,) = main([*args, "--variants", "temporal_attention_multiply"])
    assert set(result["variants"]) == {"unpatched", "temporal_attention_multiply"}
    assert result["variants"]["temporal_attention_multiply"]["max_abs_change_vs_unpatched"] > 0
    assert result["ours_vs_native"] == {}


def test_gpu_without_cuda_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from bench.gpu import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--json", str(tmp_path / "gpu.json")])
    assert exit_info.value.code == 2
    assert "No CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_allow_cpu_folds_each_step_into_one_json(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench.gpu would run at real sizes")
    from bench.gpu import main, run_step

    out = tmp_path / "gpu.json"
    figures = main(["--allow-cpu", "--only", "patch_apply", "--families", "sd15", "--json", str(out)])
    assert json.loads(out.read_text()) == figures
    assert figures["gpu_figures"] is False and "no CUDA" in figures["mode"]
    record = figures["steps"]["patch_apply/sd15"]
    assert "error" not in record, record.get("output_tail")
    assert record["command"].startswith("python -m bench.patch_apply --size tiny --family sd15 --device cpu")
    assert record["result"][0]["family"] == "sd15"
    assert set(figures["summary"]["patch_switch_s"]["sd15"]) >= {"ip_adapter", "instantid", "sag"}
    missing = run_step({"name": "x", "module": "bench.no_such_bench", "args": []}, tmp_path, 10)
    assert missing["skipped"] == "bench/no_such_bench.py is not in this checkout"
