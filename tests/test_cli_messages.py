"""What a person sees on the terminal when something is wrong or noisy: a real ``farm`` subprocess
in a fresh embedded folder. Spec and manifest errors are one actionable line (no traceback);
library noise is hidden unless ``--verbose``."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"model": "./models/sd15", "family": "sd15", "prompts": ["a cat"], "seeds": [1], "steps": 2}


def _env() -> dict[str, str]:
    """This checkout's code (not an installed copy), no farm settings, wide output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "PATCHFARM_"))}
    return {**env, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}


def farm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = _env()
    return subprocess.run(
        [sys.executable, "-m", "farm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def _error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return " ".join(out.stderr.split())


def test_a_typo_suggests_the_field_and_a_yaml_error_gives_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in SPEC.items()) + "guidence: 5\n")
    assert "guidence: unknown field; did you mean guidance?" in _error_line(farm("submit", "typo.yaml", cwd=tmp_path))
    (tmp_path / "indent.yaml").write_text("model: ./models/sd15\n  family: sd15\n")
    line = _error_line(farm("submit", "indent.yaml", cwd=tmp_path))
    assert "indent.yaml is not valid YAML: mapping values are not allowed here (line 2, column 9)" in line


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "deep.jsonl",
            b'{"id": "a"}\n{"id": "b", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}\n",
            "manifest deep.jsonl: line 2: nested too deeply to read",
        ),
        (
            "wide.csv",
            b"id,prompt\nr1,a cat\nr2," + b"x" * (129 << 10) + b"\n",
            "manifest wide.csv: line 3: a cell is longer than 131072 characters (128 KiB)",
        ),
        ("latin1.jsonl", b'{"id": "a"}\n{"id": "caf\xe9"}\n', "manifest latin1.jsonl: line 2, column 12: not UTF-8"),
        (
            "long-id.jsonl",
            json.dumps({"id": "i" * 128}).encode(),
            "manifest long-id.jsonl: line 1: id: 128 characters; an id may have at most 123",
        ),
    ],
    ids=["nested-10000", "csv-cell-129k", "not-utf8", "id-128"],
)
def test_a_bad_manifest_is_one_line_naming_the_file_and_line(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    (tmp_path / name).write_bytes(content)
    (tmp_path / "base.json").write_text(json.dumps(SPEC))
    out = farm("bulk", "submit", name, "--base", "base.json", "--name", "rows", cwd=tmp_path)
    assert expected in _error_line(out)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="no torchvision fallback to hide")
def test_torchvision_fallbacks_only_with_verbose(tmp_path: Path) -> None:
    quiet = farm("models", "tiny", "sd15", str(tmp_path / "a"), cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and "tiny sd15 model" in quiet.stdout
    loud = farm("--verbose", "models", "tiny", "sd15", str(tmp_path / "b"), cwd=tmp_path)
    assert loud.returncode == 0 and "requires torchvision (not installed); falling back" in loud.stderr


def _worker_output(tmp_path: Path, *flags: str) -> str:
    """A real embedded worker's whole terminal output, from start until it is ready, then stopped."""
    env = _env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm", *flags, "worker", "--queues", "farm.gpu.sd15"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " ready." in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), "".join(lines)[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        reader.join(10)
    return "".join(lines)


@pytest.mark.slow
def test_broker_and_celery_notices_only_with_verbose(tmp_path: Path) -> None:
    assert farm("db", "upgrade", cwd=tmp_path).returncode == 0
    quiet = _worker_output(tmp_path)
    assert "No hostname was supplied" not in quiet and "superuser privileges" not in quiet, quiet
    loud = _worker_output(tmp_path, "--verbose")
    assert "No hostname was supplied" in loud
    if os.geteuid() == 0:
        assert "superuser privileges" in loud
