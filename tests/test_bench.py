"""The benchmarks still run (tiny models, one repeat). No timings are asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_patch_apply_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.patch_apply import main

    out = tmp_path / "figures.json"
    (result,) = main(["--family", "svd", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == [result]
    rows = result["patches"]
    assert set(rows) == {"self_attention_multiply", "cross_attention_multiply", "temporal_attention_multiply"}
    assert all(row["changed_parameters"] > 0 for row in rows.values())
    assert "load/(apply+remove)" in capsys.readouterr().out
