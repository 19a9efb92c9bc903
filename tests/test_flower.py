"""`farm flower`: Flower for the farm's Celery app, started as users start it (a real process)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.farm import ROOT, text_job

FARM_TASKS = {"farm.schedule_job", "farm.render_shard", "farm.finalize_job"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment without any FARM_* or FLOWER_* setting of the developer's, plus ``extra``."""
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith("FLOWER_")}
    if base is None:
        env = {k: v for k, v in env.items() if not k.startswith("FARM_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class Flower:
    """`python -m farm flower` on a free loopback port, its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port, self.log = _free_port(), log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "farm", "flower", "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_healthy(self, timeout: float = 60.0) -> Flower:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if self.request("/healthcheck") == (200, b"OK"):
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"flower not healthy in {timeout}s:\n{self.output()[-4000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def _farm_flower(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farm", "flower", "--port", str(_free_port())],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
def test_flower_shows_the_farm_tasks_on_redis(
    farm_factory, tiny_models, redis_url, pg_url, tmp_path, fault_table
) -> None:
    row = fault_table.row(
        "Security",
        "Flower without credentials",
        "`farm flower` with basic auth from FARM_FLOWER__USER/PASSWORD; requests with no or a wrong password",
        "401 on the API and the UI; the password never on Flower's command line or in its output",
    )
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    user, password = "ops", secrets.token_urlsafe(18)
    auth = (user, password)
    env = _clean_env(farm.env, FARM_FLOWER__USER=user, FARM_FLOWER__PASSWORD=password)
    flower = Flower(env, tmp_path / "flower.log")
    try:
        flower.wait_healthy()
        # The credentials reach Flower through its environment, never its command line.
        cmdline = Path(f"/proc/{flower.proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline and b"flower" in cmdline

        worker = farm.start_worker(["farm.control", "farm.gpu.sd15"])
        with farm.client() as client:
            job_id = str(client.submit(text_job(tiny_models["sd15"])))  # 3 shards
            assert client.wait(job_id, timeout=180)["status"] == "succeeded"

        # Events arrive asynchronously: wait until Flower has every task of the job as SUCCESS.
        deadline = time.monotonic() + 60
        while True:
            status, body = flower.request("/api/tasks", auth)
            assert status == 200, body
            ours = [t for t in json.loads(body).values() if job_id in (t.get("kwargs") or "")]
            names = sorted(t["name"] for t in ours if t["state"] == "SUCCESS")
            if names.count("farm.render_shard") == 3 and names.count("farm.finalize_job") == 3:
                break
            assert time.monotonic() < deadline, f"Flower has {names} for job {job_id}"
            time.sleep(0.5)
        assert set(names) == FARM_TASKS and names.count("farm.schedule_job") == 1
        for task in ours:
            # Named kwargs, readable: the job id (and the shard id for a shard) as values.
            assert f"'job_id': '{job_id}'" in task["kwargs"], task
            assert task["worker"].startswith(f"{worker.name}@"), task
        shard = next(t for t in ours if t["name"] == "farm.render_shard")
        assert "'shard_id': '" in shard["kwargs"] and "'sent_at': " in shard["kwargs"]

        status, body = flower.request("/api/workers?refresh=1", auth)
        assert status == 200 and any(name.startswith(f"{worker.name}@") for name in json.loads(body)), body

        # Basic auth guards the API and the UI; a wrong password is refused like none.
        assert flower.request("/api/tasks")[0] == 401
        assert flower.request("/api/tasks", (user, password + "x"))[0] == 401
        assert flower.request("/tasks")[0] == 401
        assert flower.request("/tasks", auth)[0] == 200
        row.observed = "/api/tasks and /tasks: 401 without and with a wrong password, 200 with the right one"
        # ... but not /metrics (Prometheus) nor /healthcheck, as the README says.
        status, metrics = flower.request("/metrics")
        assert status == 200 and b'task="farm.render_shard"' in metrics
    finally:
        code = flower.stop()
    assert code == 0, flower.output()[-4000:]
    output = flower.output()
    assert "Visit me at http://127.0.0.1:" in output and "Traceback" not in output
    assert password not in output
    row.observed += "; password absent from /proc/PID/cmdline and from Flower's output"


def test_flower_refuses_to_start_without_credentials_outside_embedded_mode(tmp_path: Path, fault_table) -> None:
    row = fault_table.row(
        "Security",
        "Flower started without credentials",
        "`farm flower` with a Redis broker and no FARM_FLOWER__USER/PASSWORD",
        "refuses to start, saying why",
    )
    # Redis as broker makes the farm non-embedded; the refusal comes before any connection.
    base = {"FARM_DATA_DIR": str(tmp_path / "farm-data"), "FARM_BROKER__URL": "redis://127.0.0.1:6379/0"}
    out = _farm_flower(_clean_env(**base), tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "error:" in out.stderr and "Traceback" not in out.stderr
    assert "FARM_FLOWER__USER" in out.stderr and "FARM_FLOWER__PASSWORD" in out.stderr

    half = _farm_flower(_clean_env(**base, FARM_FLOWER__USER="ops"), tmp_path)
    assert half.returncode == 2 and "FARM_FLOWER__PASSWORD is not set" in half.stderr

    secret = "pw,with-a-comma"
    comma = _farm_flower(_clean_env(**base, FARM_FLOWER__USER="ops", FARM_FLOWER__PASSWORD=secret), tmp_path)
    assert comma.returncode == 2 and "FARM_FLOWER__PASSWORD must not contain ','" in comma.stderr
    assert secret not in comma.stdout + comma.stderr

    placeholder = _farm_flower(_clean_env(**base, FARM_FLOWER__USER="ops", FARM_FLOWER__PASSWORD="changeme"), tmp_path)
    assert placeholder.returncode == 2 and "flower.password is a placeholder" in placeholder.stderr
    row.observed = (
        f"exit 2: {out.stderr.strip().splitlines()[-1][:160]}; also refused: no password, ',' in it, 'changeme'"
    )

    # Embedded, without credentials: only on loopback.
    embedded = {"FARM_DATA_DIR": str(tmp_path / "farm-data"), "FARM_FLOWER__ADDRESS": "0.0.0.0"}
    public = _farm_flower(_clean_env(**embedded), tmp_path)
    assert public.returncode == 2 and "only listens on 127.0.0.1" in public.stderr
    assert "Traceback" not in public.stderr


def test_embedded_flower_runs_unauthenticated_on_loopback_and_cleans_up(tmp_path: Path) -> None:
    data = tmp_path / "farm-data"
    flower = Flower(_clean_env(FARM_DATA_DIR=str(data)), tmp_path / "flower.log")
    events = data / "broker" / "control" / "celeryev.exchange"
    try:
        flower.wait_healthy()
        assert flower.request("/")[0] == 200  # the UI, without credentials
        # Flower binds its event queue in the filesystem broker's control folder ...
        deadline = time.monotonic() + 30
        while not (events.is_file() and "celeryev." in events.read_text()):
            assert time.monotonic() < deadline, "Flower never bound its event queue"
            time.sleep(0.2)
    finally:
        code = flower.stop()
    output = flower.output()
    assert code == 0, output[-4000:]
    assert "WITHOUT authentication on 127.0.0.1" in output and "Redis or RabbitMQ" in output
    # ... and removes it when it stops, so workers do not keep writing events nobody reads.
    assert json.loads(events.read_text()) == []
