"""The README's examples run as written: the Python client example against the embedded farm with
a real worker, and the real-services recipe (Postgres, Redis, SeaweedFS) on this machine. Each
block to run is marked ``<!-- readme-test: NAME -->`` in the README."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.farm import ROOT
from tests.fixtures.services import free_port, service_missing

README = ROOT / "README.md"


def readme_block(name: str) -> str:
    found = re.search(rf"<!-- readme-test: {name} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert found, f"README lost its {name} example"
    return found.group(1)


@pytest.mark.slow
def test_the_python_client_example_runs(farm_factory, tiny_models, tmp_path: Path) -> None:
    farm = farm_factory()  # the embedded farm in tmp_path/farm-data, as `farm demo` leaves it
    shutil.copytree(tiny_models["sd15"], tmp_path / "farm-data" / "models" / "tiny-sd15")
    farm.start_worker(["farm.control", "farm.gpu.sd15"], name="readme")
    done = subprocess.run(
        [sys.executable, "-c", readme_block("python-client")],
        cwd=tmp_path,
        env=farm.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted ")
    assert "succeeded 2 of 2 shards," in done.stdout, done.stdout
    outputs = [line for line in lines if "a lighthouse at" in line]
    assert len(outputs) == 4 and all("file://" in line for line in outputs)


@pytest.mark.integration
@pytest.mark.slow
def test_the_real_services_recipe_runs(tmp_path: Path) -> None:
    for tool in ("createdb", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            service_missing(f"{tool} is not installed")
    state, redis_port, db_name = tmp_path / "state", free_port(), f"farm_readme_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_", "S3_"))}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        STATE=str(state),
        REDIS_PORT=str(redis_port),
        S3_PORT=str(free_port()),
        DB_NAME=db_name,
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
        PYTHONPATH=str(ROOT),
    )
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", readme_block("real-services")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "result:  ok" in done.stdout, done.stdout
        assert "SeaweedFS" in done.stdout or "renders" in done.stdout
    finally:
        pid = state / "weed.pid"
        if pid.is_file():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGTERM)
        subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], capture_output=True, timeout=30)
        subprocess.run(
            ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", db_name],
            capture_output=True,
            timeout=60,
        )
