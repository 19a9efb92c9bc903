"""What the process-level benchmarks share: scratch services and real worker processes.

- :func:`scratch_postgres`: a new Postgres database, migrated to head, dropped at the end.
- :func:`scratch_redis`: a Redis db that must be empty at the start; flushed at the end.
- :func:`scratch_rabbitmq`: a new RabbitMQ vhost (``rabbitmqctl``, guest allowed), deleted at the end.
- :class:`WorkerProcess`: a worker command (``python -m farm worker``, ``python -m bench.farm_worker``,
  ``python -m bench.bare_celery``) with its own log, ready once it answers a Celery ping.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Test sessions spread over Redis dbs 1-15 (tests/fixtures/brokers.py) and flush theirs; 0 is
# left to developers, so a bench run defaults to it (and refuses it when it is not empty).
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672"


@contextmanager
def scratch_postgres(pg_admin: str = PG_ADMIN) -> Iterator[str]:
    """A fresh database (``farm_bench_<hex>``) migrated to head; its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    from storage.migrate import upgrade

    def admin(sql: str) -> None:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(sql)

    name = f"farm_bench_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(pg_admin).set(drivername="postgresql+psycopg", database=name)
        url_s = url.render_as_string(hide_password=False)
        upgrade(url_s)
        yield url_s
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_redis(url: str = REDIS_URL) -> Iterator[str]:
    """``url`` after checking its db is empty; the db is flushed at the end."""
    import redis

    client = redis.Redis.from_url(url)
    if client.dbsize():
        client.close()
        raise SystemExit(f"{url} is not empty; pick an unused Redis db with --redis-url")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@contextmanager
def scratch_rabbitmq(base: str = RABBITMQ) -> Iterator[str]:
    """A new vhost on the local RabbitMQ (so the farm's fixed queue names collide with nobody);
    its amqp URL. Needs ``rabbitmqctl`` (run as a user allowed to use it)."""
    ctl = shutil.which("rabbitmqctl") or ("/usr/sbin/rabbitmqctl" if Path("/usr/sbin/rabbitmqctl").exists() else None)
    if ctl is None:
        raise SystemExit("rabbitmqctl not found: cannot make a scratch vhost (give an empty vhost with --rabbitmq-url)")
    vhost = f"farm_bench_{uuid.uuid4().hex[:12]}"

    def ctl_run(*args: str) -> None:
        done = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise SystemExit(f"rabbitmqctl {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-500:]}")

    ctl_run("add_vhost", vhost)
    try:
        user = base.split("://", 1)[1].split(":", 1)[0]
        ctl_run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{base.rstrip('/')}/{vhost}"
    finally:
        ctl_run("delete_vhost", vhost)


def worker_env(data_dir: Path, db_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker process: no inherited ``FARM_*``, these settings instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(
        {
            "FARM_DATA_DIR": str(data_dir),
            "FARM_DB__URL": db_url,
            "FARM_BROKER__URL": broker_url,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        }
    )
    env.update(extra)
    return env


class WorkerProcess:
    """``python -m <module> <args>`` with its output in ``log``; ``name`` is its Celery node name
    (the part before ``@``)."""

    def __init__(self, module: str, args: list[str], name: str, env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def wait_ready(app: Any, workers: list[WorkerProcess], timeout: float = 120.0) -> float:
    """Block until every worker answers a Celery ping on ``app``'s broker; returns the seconds waited."""
    started = time.monotonic()
    waiting = {w.name: w for w in workers}
    while waiting:
        for worker in waiting.values():
            worker.check_alive()
        if time.monotonic() - started > timeout:
            names = ", ".join(waiting)
            tails = "\n".join(w.tail(1500) for w in waiting.values())
            raise RuntimeError(f"workers {names} not ready after {timeout:.0f}s:\n{tails}")
        try:
            replies = app.control.ping(timeout=0.5) or []
        except OSError:  # the broker dropped the connection (restarting): ask again
            replies = []
            time.sleep(0.5)
        for reply in replies:
            for node in reply:
                waiting.pop(node.partition("@")[0], None)
    return time.monotonic() - started


def stop_all(workers: list[WorkerProcess]) -> None:
    """SIGTERM to every worker first (they shut down in parallel), then wait for each."""
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()
