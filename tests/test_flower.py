"""`farm flower`: Flower for the farm's Celery app, started as users start it (a real process)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from tests.fixtures.farm import ROOT, text_job
from tests.fixtures.services import wait_for

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
            # One finalize at least: the shard that ends the job sends it (another one only when
            # the job's roll-up falls due meanwhile, worker.rollup_interval_s).
            if names.count("farm.render_shard") == 3 and names.count("farm.finalize_job") >= 1:
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
        # A person finds a shard by its args (short job id, index, kind, family); its result says
        # how many items it rendered and where they are.
        shards = sorted((t for t in ours if t["name"] == "farm.render_shard"), key=lambda t: t["args"])
        labels = [f"job={job_id[:8]} shard={i} sd15 text_to_image" for i in range(3)]
        assert [t["args"] for t in shards] == labels, shards
        for i, task in enumerate(shards):
            assert "'items_done': '2/2'" in task["result"] and f"/{job_id}/{i:05d}'" in task["result"], task
        query = urllib.parse.quote(f"{job_id[:8]} shard=1")
        status, body = flower.request(f"/api/tasks?search={query}", auth)
        assert status == 200 and [t["args"] for t in json.loads(body).values()] == [labels[1]], body

        status, body = flower.request("/api/workers?refresh=1", auth)
        assert status == 200 and any(name.startswith(f"{worker.name}@") for name in json.loads(body)), body

        # Basic auth guards the API and the UI; a wrong password is refused like none.
        assert flower.request("/api/tasks")[0] == 401
        assert flower.request("/api/tasks", (user, password + "x"))[0] == 401
        assert flower.request("/tasks")[0] == 401
        status, page = flower.request("/tasks", auth)
        # The tasks page shows each task's args (which shard) and result (what it did).
        assert status == 200 and b'data-column="args"' in page and b'data-column="result"' in page
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


HOLD_S = 24.0  # worker.slow_shards_s: how long the drill holds the shard
AMQP_HEARTBEAT_S = 4  # RabbitMQ: a 24 s render spans six heartbeat intervals
# When Flower is asked, in seconds after it first saw the shard STARTED: the last one is past three
# AMQP heartbeat intervals and several of the worker's 2 s event heartbeats (Flower calls a worker
# offline 4 s after its last one); the hold leaves the inspect call after them time to answer.
LOOK_AT_S = (3.0, 9.0, 15.0)
SHARD_LABEL = "shard=0 sd15 text_to_image"


def _job_tasks(flower: Flower, auth: tuple[str, str], job_id: str) -> list[dict]:
    status, body = flower.request("/api/tasks", auth)
    assert status == 200, body
    return [t for t in json.loads(body).values() if job_id in (t.get("kwargs") or "")]


def _render_task(flower: Flower, auth: tuple[str, str], job_id: str) -> dict | None:
    return next((t for t in _job_tasks(flower, auth, job_id) if t["name"] == "farm.render_shard"), None)


def _screenshots(flower: Flower, auth: tuple[str, str], broker: str) -> None:
    """With FARM_TEST_FLOWER_SCREENSHOTS=DIR (and Chromium installed), Flower's tasks and workers
    pages as PNGs in DIR, taken now (how docs/flower.png is made: mid-render)."""
    folder = os.environ.get("FARM_TEST_FLOWER_SCREENSHOTS")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not folder or not chromium:
        return
    for page in ("tasks", "workers"):
        out = Path(folder) / f"flower-{broker}-{page}.png"
        url = f"http://{auth[0]}:{auth[1]}@127.0.0.1:{flower.port}/{page}"
        args = ["--headless", "--no-sandbox", "--hide-scrollbars", "--virtual-time-budget=8000"]
        subprocess.run(
            [chromium, *args, "--window-size=1800,1000", f"--screenshot={out}", url], capture_output=True, timeout=120
        )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_flower_sees_a_worker_while_it_renders(
    broker, request, farm_factory, tiny_models, pg_url, tmp_path, fault_table
) -> None:
    """A worker holding one shard for ``HOLD_S`` (a fault drill, ``worker.slow_shards``) stays online
    in Flower, its shard shows STARTED on it from the start with a readable label, it answers
    Flower's inspect calls, and (RabbitMQ, ``AMQP_HEARTBEAT_S`` heartbeats) its connection lives
    through the render."""
    heartbeat = f"; AMQP heartbeat {AMQP_HEARTBEAT_S} s" if broker == "rabbitmq" else ""
    row = fault_table.row(
        "Long shards",
        f"Flower while a worker renders for {HOLD_S:.0f} s ({broker})",
        f"one worker on farm.control + farm.gpu.sd15 holds its shard {HOLD_S:.0f} s (worker.slow_shards)"
        f"{heartbeat}; Flower's HTTP API polled during the render",
        "worker online, its shard STARTED on it with job, shard, kind and family in its args, the worker "
        "answers inspect; no reconnect, no redelivery; the result says items done and where the outputs are",
    )
    extra = {"FARM_WORKER__SLOW_SHARDS": "[0]", "FARM_WORKER__SLOW_SHARDS_S": str(HOLD_S)}
    if broker == "rabbitmq":
        extra["FARM_BROKER__HEARTBEAT_S"] = str(AMQP_HEARTBEAT_S)
    farm = farm_factory(broker=request.getfixturevalue(f"{broker}_url"), db_url=pg_url, **extra)
    auth = ("ops", secrets.token_urlsafe(18))
    env = _clean_env(farm.env, FARM_FLOWER__USER=auth[0], FARM_FLOWER__PASSWORD=auth[1])
    flower = Flower(env, tmp_path / "flower.log")
    try:
        worker = farm.start_worker(["farm.control", "farm.gpu.sd15"])  # starts while Flower does
        flower.wait_healthy()  # Flower listens for events before the job is sent
        with farm.client() as client:
            job_id = str(client.submit(text_job(tiny_models["sd15"], prompts=["a red cube"], count=1)))

            def shard_running() -> bool:
                return client.get(job_id)["shards"][0]["status"] == "running"

            def seen_past_pending() -> dict | None:
                task = _render_task(flower, auth, job_id)
                return task if task and task["state"] not in {"PENDING", "RECEIVED"} else None

            first = wait_for(seen_past_pending, 120, "Flower to see the shard's task received and started")
            seen_at = time.monotonic()
            # The render has most of HOLD_S to go: Flower must already know it STARTED, on this worker.
            assert shard_running(), "the shard ended before Flower saw it start"
            assert first["state"] == "STARTED" and first["worker"].startswith(f"{worker.name}@"), first
            assert first["args"] == f"job={job_id[:8]} {SHARD_LABEL}", first
            assert f"'shard_id': '{client.get(job_id)['shards'][0]['id']}'" in first["kwargs"], first

            _screenshots(flower, auth, broker)
            observations = []
            for offset in LOOK_AT_S:
                time.sleep(max(0.0, seen_at + offset - time.monotonic()))
                status, body = flower.request("/api/workers?status=true", auth)
                assert status == 200, body
                online = json.loads(body)
                task = _render_task(flower, auth, job_id)
                assert shard_running(), f"the shard ended before {offset:.0f} s: lower offsets or a longer hold"
                observations.append((offset, online, task["state"]))
                assert online.get(task["worker"]) is True, (offset, online)
                assert task["state"] == "STARTED", (offset, task)

            _screenshots(flower, auth, broker)

            # The worker's consumer loop answers Flower's inspect calls mid-render.
            def active_on_worker() -> list:
                status, body = flower.request(f"/api/workers?refresh=1&workername={first['worker']}", auth)
                info = json.loads(body).get(first["worker"], {}) if status == 200 else {}
                return [t["id"] for t in info.get("active") or []]

            active = wait_for(active_on_worker, 30, "the worker to list its shard as active", interval=1.0)
            assert active == [first["uuid"]], active
            summary = client.wait(job_id, timeout=300)
        assert summary["status"] == "succeeded", summary
        (shard,) = summary["shards"]
        assert shard["attempts"] == 1, shard

        def final_states() -> list[dict] | None:
            tasks = _job_tasks(flower, auth, job_id)
            names = sorted(t["name"] for t in tasks if t["state"] == "SUCCESS")
            return tasks if names == sorted(FARM_TASKS) else None

        tasks = {t["name"]: t for t in wait_for(final_states, 60, "every task of the job SUCCESS in Flower")}
        done = tasks["farm.render_shard"]
        outputs = str(Path(farm.env["FARM_DATA_DIR"]).resolve() / "objects" / "tests" / job_id / "00000")
        assert "'items_done': '1/1'" in done["result"] and f"'outputs': '{outputs}'" in done["result"], done
        assert tasks["farm.finalize_job"]["args"] == tasks["farm.schedule_job"]["args"] == f"job={job_id[:8]}"
    finally:
        code = flower.stop()
    assert code == 0, flower.output()[-4000:]
    log = worker.log.read_text(errors="replace")
    # One delivery: no reconnection (a missed heartbeat drops the connection) and no redelivery.
    assert "Connection to broker lost" not in log and "missed heartbeats" not in log, log[-4000:]
    assert log.count("'outcome': ") == 1 and "'outcome': 'succeeded'" in log, log[-4000:]
    ran = datetime.fromisoformat(summary["finished_at"]) - datetime.fromisoformat(summary["started_at"])
    offsets = ", +".join(f"{o:.0f}" for o, _, _ in observations)
    row.observed = (
        f"job ran {ran.total_seconds():.0f} s; Flower saw the shard STARTED on {first['worker']} with args "
        f"'{first['args']}' while it ran; at +{offsets} s the worker online and the shard STARTED every time; "
        f"inspect listed it active; 1 attempt, 1 delivery, no reconnect; result {done['result'][:200]}"
    )
