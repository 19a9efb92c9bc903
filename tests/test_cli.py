"""The `farm` command as a user runs it: a real subprocess, settings from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def farm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "farm", *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_command_groups(tmp_path: Path) -> None:
    out = farm("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("db", "config", "storage", "FARM_"):
        assert word in out.stdout


def test_embedded_db_upgrade_and_storage_check(tmp_path: Path) -> None:
    assert farm("db", "current", cwd=tmp_path).stdout.strip() == "none"
    up = farm("db", "upgrade", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert (tmp_path / "farm-data" / "farm.db").is_file()
    assert farm("db", "current", cwd=tmp_path).stdout.strip() == farm("db", "heads", cwd=tmp_path).stdout.strip()
    assert farm("db", "upgrade", cwd=tmp_path).returncode == 0  # idempotent
    check = farm("storage", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "result:  ok" in check.stdout
    assert "LocalStore" in check.stdout or "farm-data" in check.stdout


@pytest.mark.integration
def test_db_upgrade_on_postgres(tmp_path: Path, empty_pg_url: str) -> None:
    env = {"FARM_DB__URL": empty_pg_url}
    assert farm("db", "current", cwd=tmp_path, env=env).stdout.strip() == "none"
    up = farm("db", "upgrade", cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    heads = farm("db", "heads", cwd=tmp_path).stdout.strip()
    assert farm("db", "current", cwd=tmp_path, env=env).stdout.strip() == heads
    down = farm("db", "downgrade", "base", cwd=tmp_path, env=env)
    assert down.returncode == 0, down.stderr
    assert farm("db", "current", cwd=tmp_path, env=env).stdout.strip() == "none"


@pytest.mark.integration
def test_storage_check_against_s3(tmp_path: Path, seaweedfs) -> None:
    secret = seaweedfs.secret_access_key
    env = {
        "FARM_STORAGE__BACKEND": "s3",
        "FARM_STORAGE__S3__ENDPOINT_URL": seaweedfs.endpoint_url,
        "FARM_STORAGE__S3__REGION": seaweedfs.region,
        "FARM_STORAGE__S3__BUCKET": "cli-check",
        "FARM_STORAGE__S3__PREFIX": "team/a",
        "FARM_STORAGE__S3__CREATE_BUCKET": "true",
        "FARM_STORAGE__S3__ACCESS_KEY_ID": seaweedfs.access_key_id,
        "FARM_STORAGE__S3__SECRET_ACCESS_KEY": secret,
    }
    check = farm("storage", "check", cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stderr
    assert "result:  ok" in check.stdout
    assert secret not in check.stdout + check.stderr

    wrong = farm(
        "storage",
        "check",
        cwd=tmp_path,
        env={**env, "FARM_STORAGE__S3__SECRET_ACCESS_KEY": "wrong-" + secret},
    )
    assert wrong.returncode != 0
    assert "Traceback" not in wrong.stderr
    assert "error:" in wrong.stderr
    assert secret not in wrong.stdout + wrong.stderr


def test_bad_settings_exit_with_a_clear_error(tmp_path: Path) -> None:
    out = farm("db", "current", cwd=tmp_path, env={"FARM_DB__URL": "postgresql://farm:changeme@db/farm"})
    assert out.returncode == 2
    assert "placeholder secret" in out.stderr
    assert "Traceback" not in out.stderr
    assert "changeme" not in out.stderr


def test_config_show_hides_secrets(tmp_path: Path) -> None:
    out = farm("config", "show", cwd=tmp_path, env={"FARM_DB__URL": "postgresql://farm:Hunter2-real@db/farm"})
    assert out.returncode == 0, out.stderr
    assert "Hunter2-real" not in out.stdout
    assert "FARM_DB__URL" in out.stdout


@pytest.mark.slow
def test_demo_runs_the_embedded_farm(tmp_path: Path) -> None:
    """The README's main command on a fresh folder: tiny model, worker process, 3-shard job."""
    out = farm("demo", cwd=tmp_path, env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout and "6/6" in out.stdout
    outputs = list((tmp_path / "farm-data" / "objects" / "demo").glob("*/"))
    assert len(outputs) == 1
    assert len(list(outputs[0].glob("*/*.png"))) == 6
    assert (outputs[0] / "contact_sheet.png").is_file() and (outputs[0] / "manifest.json").is_file()
    assert "worker stopped" in out.stdout

    wide = {"COLUMNS": "250"}
    jobs = farm("status", cwd=tmp_path, env=wide)
    assert jobs.returncode == 0 and "s/item" in jobs.stdout and "succeeded" in jobs.stdout
    one = farm("status", outputs[0].name, cwd=tmp_path, env=wide)
    assert one.returncode == 0 and "s/item" in one.stdout and "100%" in one.stdout
    assert "contact sheet: " in one.stdout and "contact_sheet.png" in one.stdout
    workers = farm("workers", cwd=tmp_path, env=wide)
    assert workers.returncode == 0 and "stopped" in workers.stdout and "farm.gpu.sd15" in workers.stdout


def test_models_tiny_is_deterministic_and_careful(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        out = farm("models", "tiny", "sdxl", str(folder), "--seed", "3", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(weights) == 4  # unet, vae, two text encoders
    assert all((a / w).read_bytes() == (b / w).read_bytes() for w in weights)
    again = farm("models", "tiny", "sd15", str(a), cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stdout
    bad = farm("models", "tiny", "sd3", str(tmp_path / "c"), cwd=tmp_path)
    assert bad.returncode == 2 and "sd3" in bad.stderr


def test_beat_sends_the_bulk_top_up_and_keeps_no_pickled_schedule(tmp_path: Path) -> None:
    """`farm beat` with the in-memory scheduler: the window top-up goes out every interval."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env |= {"FARM_SCHEDULING__FEED_INTERVAL_S": "0.5", "FARM_BULK__SCHEDULES": "[]"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm", "beat"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=6)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "Sending due task farm-feed-bulk (farm.feed_bulk)" in out, out[-3000:]
    assert not list(tmp_path.glob("celerybeat-schedule*"))  # no shelve file: nothing pickled


def test_models_prefetch_warms_the_configured_models_or_says_there_are_none(tmp_path: Path) -> None:
    """Compose's model-prefetch step runs `farm models prefetch` with no names: the models of
    worker.prefetch_models, or nothing (exit 0), so a farm without registry models starts too."""
    none = farm("models", "prefetch", cwd=tmp_path)
    assert none.returncode == 0, none.stderr
    assert "nothing to prefetch" in none.stdout
    missing = farm("models", "prefetch", cwd=tmp_path, env={"FARM_WORKER__PREFETCH_MODELS": '["absent"]'})
    assert missing.returncode != 0 and "no model 'absent' in the registry" in missing.stderr
