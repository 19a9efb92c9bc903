"""Worker death and long shards, with real worker processes on Redis and RabbitMQ.

- A worker SIGKILLed mid-shard: the broker redelivers (RabbitMQ when the connection drops, Redis
  after its visibility timeout), another worker re-runs the shard and each output exists once.
- A worker frozen (SIGSTOP) past its lease and then thawed: its shard is taken over, and the thawed
  attempt's late writes are fenced out by the lease.
- A shard longer than the Redis visibility timeout: Redis delivers it again while it runs; the
  lease makes the second delivery stand down, so it runs once.
- A shard longer than RabbitMQ's ``consumer_timeout`` (past which RabbitMQ closes the channel and
  Celery stops the worker): the worker hands it back between items in time, keeping the items done.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time

import pytest
from sqlalchemy import func, select

from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, Job, Shard
from tests.fixtures.farm import text_job
from tests.fixtures.services import service_missing, wait_for

FAST_LOSS = {"FARM_WORKER__LEASE_SECONDS": "5", "FARM_WORKER__LOST_AFTER_S": "4"}


@pytest.fixture
def factory(pg_url):
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()


def _running_on(factory, job_id, owner: str) -> bool:
    with session_scope(factory) as s:
        return bool(s.scalar(select(func.count()).where(Shard.job_id == job_id, Shard.lease_owner == owner)))


def _artifacts(factory, job_id) -> list[Artifact]:
    with session_scope(factory) as s:
        return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.item_index)))


def _span(factory, job_id) -> float:
    """Seconds from the job's start to its end."""
    with session_scope(factory) as s:
        start, end = s.execute(select(Job.started_at, Job.finished_at).where(Job.id == job_id)).one()
    return (end - start).total_seconds()


def _outcomes(worker, outcome: str) -> int:
    """How many deliveries the worker's log says ended with ``outcome``."""
    return worker.log.read_text(errors="replace").count(f"'outcome': '{outcome}'")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_killed_worker_shard_is_rerun_by_another(
    broker, request, farm_factory, tiny_models, pg_url, factory, fault_table
):
    redelivery = "after the 5 s visibility timeout" if broker == "redis" else "when its connection drops"
    row = fault_table.row(
        "Worker death",
        f"worker SIGKILLed mid-shard ({broker})",
        f"SIGKILL while it holds a shard's lease; the broker redelivers {redelivery}; a second worker starts",
        "another worker re-runs the shard, the job succeeds, each output exists once",
    )
    farm = farm_factory(
        broker=request.getfixturevalue(f"{broker}_url"),
        db_url=pg_url,
        FARM_BROKER__VISIBILITY_TIMEOUT="5",
        **FAST_LOSS,
    )
    farm.start_worker(["farm.control"], name="control")
    victim = farm.start_worker(["farm.gpu.sd15"], name="victim")
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], steps=60, count=1, prompts=["a", "b"], shard_size=1))
        wait_for(lambda: _running_on(factory, job_id, "victim"), 90, "the victim to hold a lease")
        victim.kill()
        killed = time.monotonic()
        farm.start_worker(["farm.gpu.sd15"], name="rescuer")
        summary = client.wait(job_id, timeout=240)
        finished = time.monotonic() - killed
    assert summary["status"] == "succeeded", summary
    keys = [a.key for a in _artifacts(factory, job_id)]
    assert len(keys) == len(set(keys)) == 2
    taken_over = [sh for sh in summary["shards"] if sh["attempts"] > 1]
    assert taken_over and all(sh["worker"] == "rescuer" for sh in taken_over)
    assert any("lease expired" in e for sh in taken_over for e in sh["errors"])
    row.observed = (
        f"{len(taken_over)} shard re-run by the rescuer (attempt {taken_over[0]['attempts']}, note "
        f"'lease expired'); job succeeded {finished:.1f} s after the kill; {len(keys)} artifacts, "
        f"{len(set(keys))} distinct keys"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_frozen_worker_late_writes_are_fenced_out(farm_factory, tiny_models, pg_url, redis_url, factory, fault_table):
    row = fault_table.row(
        "Worker death",
        "worker frozen past its lease, then thawed (Redis)",
        "SIGSTOP mid-shard; a second worker starts; SIGCONT once the job is done",
        "the shard is taken over; the thawed attempt's writes are refused (fenced); outputs match their records",
    )
    farm = farm_factory(broker=redis_url, db_url=pg_url, FARM_BROKER__VISIBILITY_TIMEOUT="8", **FAST_LOSS)
    farm.start_worker(["farm.control"], name="control")
    frozen = farm.start_worker(["farm.gpu.sd15"], name="frozen")
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], steps=60, count=1, prompts=["a", "b"], shard_size=2))
        wait_for(lambda: _running_on(factory, job_id, "frozen"), 90, "the frozen worker to hold the lease")
        frozen.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            farm.start_worker(["farm.gpu.sd15"], name="rescuer")
            summary = client.wait(job_id, timeout=240)
        finally:
            frozen.proc.send_signal(signal.SIGCONT)
        frozen_s = time.monotonic() - stopped
        fenced = wait_for(lambda: _outcomes(frozen, "fenced"), 90, "the thawed attempt to be fenced out")
        store = client.store
        artifacts = _artifacts(factory, job_id)
        stored = {a.key: hashlib.sha256(store.get_bytes(a.key)).hexdigest() for a in artifacts}
    assert summary["status"] == "succeeded", summary
    (shard,) = summary["shards"]
    assert shard["worker"] == "rescuer" and shard["attempts"] == 2
    with session_scope(factory) as s:
        token = s.scalar(select(Shard.fencing_token).where(Shard.job_id == job_id))
    assert len(artifacts) == 2 and {a.fencing_token for a in artifacts} == {token}
    assert all(stored[a.key] == a.sha256 for a in artifacts)
    assert frozen.proc.poll() is None, "the thawed worker keeps running"
    row.observed = (
        f"frozen {frozen_s:.1f} s; rescuer ran attempt 2 and the job succeeded; after SIGCONT the old attempt "
        f"ended 'fenced' ({fenced}x in its log), the worker lives on; {len(artifacts)} artifacts, all with the "
        f"rescuer's fencing token {token}; stored bytes match the recorded sha256"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_shard_longer_than_redis_visibility_timeout_runs_once(
    farm_factory, tiny_models, pg_url, redis_url, factory, fault_table
) -> None:
    row = fault_table.row(
        "Long shards",
        "shard longer than the Redis visibility timeout",
        "visibility_timeout 5 s, a shard of about 10 s or more, two idle-ready workers",
        "Redis redelivers while the shard runs; the lease makes the second delivery stand down; one attempt",
    )
    farm = farm_factory(broker=redis_url, db_url=pg_url, FARM_BROKER__VISIBILITY_TIMEOUT="5", **FAST_LOSS)
    farm.start_worker(["farm.control"], name="control")
    workers = [farm.start_worker(["farm.gpu.sd15"], name=n) for n in ("long-a", "long-b")]
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], steps=70, count=1, prompts=["a", "b"], shard_size=2))
        summary = client.wait(job_id, timeout=300)
    assert summary["status"] == "succeeded", summary
    (shard,) = summary["shards"]
    busy = sum(_outcomes(w, "busy") for w in workers)
    skipped = sum(_outcomes(w, "skipped") for w in workers)
    assert shard["attempts"] == 1 and busy >= 1, (shard, busy)
    assert len({a.key for a in _artifacts(factory, job_id)}) == len(_artifacts(factory, job_id)) == 2
    row.observed = (
        f"job ran {_span(factory, job_id):.1f} s on {shard['worker']}; redelivered copies "
        f"answered 'busy' {busy}x and 'skipped' {skipped}x; 1 attempt, 2 artifacts"
    )


def _rabbitmqctl(*args: str) -> str:
    try:
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        service_missing("rabbitmqctl is not installed")
    if done.returncode != 0:
        service_missing(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()[:300]}")
    return done.stdout.strip()


CONSUMER_TIMEOUT_S = 10


# RabbitMQ's own defaults, put back when a killed run left this fixture's values behind (a
# channel_tick_interval that is unset makes RabbitMQ 3.10 fail every new channel).
RABBITMQ_DEFAULTS = {"consumer_timeout": 1_800_000, "channel_tick_interval": 60_000}
OURS = {"consumer_timeout": CONSUMER_TIMEOUT_S * 1000, "channel_tick_interval": 1000}


def _rabbit_env(key: str) -> int | None:
    value = _rabbitmqctl("eval", f"application:get_env(rabbit, {key}).")
    return int(value[4:-1]) if value.startswith("{ok,") and value[4:-1].isdigit() else None


@pytest.fixture
def short_consumer_timeout(request, rabbitmq_url):
    """RabbitMQ's ``consumer_timeout`` at 10 s (checked every second) for channels opened meanwhile;
    the server's own values come back at the end. The setting is the server's, felt by every
    vhost, so the test runs alone (``@pytest.mark.alone``)."""
    assert request.node.get_closest_marker("alone"), "a test that changes RabbitMQ's consumer_timeout runs alone"
    before = {key: _rabbit_env(key) for key in OURS}
    for key, value in OURS.items():
        _rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {value}).")
    try:
        yield CONSUMER_TIMEOUT_S
    finally:
        for key, value in before.items():
            if value is None or value == OURS[key]:  # unset, or left by a killed run
                value = RABBITMQ_DEFAULTS[key]
            _rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {value}).")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.alone
def test_shard_longer_than_rabbitmq_consumer_timeout_is_handed_back(
    farm_factory, tiny_models, pg_url, rabbitmq_url, short_consumer_timeout, factory, fault_table
) -> None:
    row = fault_table.row(
        "Long shards",
        "shard longer than RabbitMQ's consumer_timeout",
        f"consumer_timeout {short_consumer_timeout} s on the server (rabbitmqctl eval) and in "
        "broker.consumer_timeout_s; a shard of 6 images",
        "the worker hands the shard back between items before the timeout (items kept); RabbitMQ never closes "
        "the channel (a closed channel stops the Celery worker); one attempt; the job completes",
    )
    farm = farm_factory(
        broker=rabbitmq_url, db_url=pg_url, FARM_BROKER__CONSUMER_TIMEOUT_S=str(short_consumer_timeout), **FAST_LOSS
    )
    farm.start_worker(["farm.control"], name="control")
    workers = [farm.start_worker(["farm.gpu.sd15"], name=n) for n in ("amqp-a", "amqp-b")]
    prompts = [f"p{i}" for i in range(6)]
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], steps=20, count=1, prompts=prompts, shard_size=6))
        summary = client.wait(job_id, timeout=300)
    logs = "".join(w.log.read_text(errors="replace") for w in workers)
    handed_back = sum(_outcomes(w, "handed_back") for w in workers)
    (shard,) = summary["shards"]
    assert "PRECONDITION_FAILED" not in logs, "RabbitMQ closed a channel: a delivery outlived consumer_timeout"
    assert summary["status"] == "succeeded", summary
    assert handed_back >= 1 and shard["attempts"] == 1, (handed_back, shard)
    keys = [a.key for a in _artifacts(factory, job_id)]
    assert len(keys) == len(set(keys)) == 6
    assert all(w.proc.poll() is None for w in workers)
    row.observed = (
        f"handed back {handed_back}x between items, {handed_back + 1} deliveries in a job of "
        f"{_span(factory, job_id):.1f} s; no channel closed; attempts 1; 6 artifacts, 6 distinct keys; "
        "both workers alive"
    )
