"""Draining a worker on SIGTERM (farm/worker/drain.py), with real worker processes mid-shard.

Fake-render workers (``python -m bench.farm_worker``: ``farm worker`` with the bench's ``bench_noop``
kind, whose items sleep ``item_seconds``) on Postgres and Redis (the first test on RabbitMQ too).
Each signal is sent just after an item ended (read from the shard's ``items_done``), so the next
item is in progress:

- SIGTERM mid-shard: the worker is no queue's consumer at once (registry: draining), exits 0
  within ``worker.drain_timeout_s``; the shard is handed back PENDING with its items kept and no
  attempt counted; a second worker renders the rest: every item once, the job succeeds;
- SIGTERM on the last item: the shard finishes on the same worker, which then exits 0;
- a second SIGTERM, or an item longer than the drain's bound: the worker stops at once (exit 1),
  its lease is expired and another worker takes the shard over (attempt counted, as after a lost
  worker); the job still ends, every item once;
- SIGKILL during the drain (a fault nobody lists): the lease expires on its own, the draining row
  is swept lost, the job still ends, every item once.

The registry's draining state and the health check are checked without workers on SQLite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, Shard, Worker
from storage.registry import (
    list_workers,
    live_workers,
    mark_draining,
    queue_consumers,
    register_worker,
    stop_worker,
    sweep_lost_workers,
    worker_heartbeat,
)
from storage.status import ShardStatus, WorkerStatus
from tests.fixtures.noop_jobs import noop_spec
from tests.fixtures.services import wait_for

QUEUE = "farm.gpu.sd15"
DRAIN_TIMEOUT_S = 30
FAST = {
    "FARM_WORKER__PROGRESS_INTERVAL_S": "0.2",  # items_done is written this often
    "FARM_WORKER__ROLLUP_INTERVAL_S": "1",
    "FARM_WORKER__DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
    "FARM_WORKER__LEASE_SECONDS": "5",
    "FARM_WORKER__LOST_AFTER_S": "4",
    "FARM_BROKER__VISIBILITY_TIMEOUT": "5",
    "FARM_RECONCILE__INTERVAL_S": "2",
    "FARM_RECONCILE__STUCK_AFTER_S": "5",
}

# A forced stop: the item in progress outlasts the drain's bound (or the second SIGTERM) by 4 s or more, so
# the worker stops (exit 1) well before the item could end and the drain finish on its own (exit 0).
FORCED_ITEM_S = 6.0
FORCED_BOUND_S = 2.0

pytestmark = pytest.mark.usefixtures("bench_kind")  # this module submits bench_noop jobs


@pytest.fixture
def factory(pg_url):
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()


class Drill:
    """One farm on Postgres and a broker (Redis unless told): a control worker and fake-render
    workers on ``QUEUE``; the ``first`` of them starts up together with the control worker."""

    def __init__(self, farm_factory, pg_url: str, broker_url: str, tiny_models, first: str, **env: str) -> None:
        self.farm = farm_factory(broker=broker_url, db_url=pg_url, **{**FAST, **env})
        self.model = tiny_models["sd15"]
        self.engine = make_engine(pg_url)
        self.sessions = make_session_factory(self.engine)
        launched = [self.farm.launch_worker(["farm.control"], "control", module="bench.farm_worker")]
        launched.append(self.farm.launch_worker([QUEUE], first, module="bench.farm_worker"))
        self._first = {first: launched[-1]}
        for worker in launched:
            worker.wait_ready(timeout=120)
        self.client = self.farm.client()

    def worker(self, name: str):
        """The worker ``name`` on ``QUEUE``: the first one (started already), or a new one."""
        if name in self._first:
            return self._first.pop(name)
        (started,) = self.farm.start_workers([QUEUE], [name], module="bench.farm_worker")
        return started

    def submit(self, items: int, item_seconds: float) -> uuid.UUID:
        return self.client.submit(noop_spec(self.model, 1, items, item_seconds, f"drain-{uuid.uuid4().hex[:8]}"))

    def shard(self, job_id: uuid.UUID) -> Any:
        with session_scope(self.sessions) as s:
            return s.execute(
                select(
                    Shard.id,
                    Shard.status,
                    Shard.lease_owner,
                    Shard.items_done,
                    Shard.attempts,
                    Shard.fencing_token,
                    Shard.errors,
                ).where(Shard.job_id == job_id)
            ).one_or_none()

    def signal_after_item(self, worker, job_id: uuid.UUID, items_done: int, *signals: signal.Signals) -> float:
        """Send ``signals`` (0.3 s apart) to ``worker`` as soon as its shard has ``items_done``
        items written (the next item is then in progress). Returns when the first was sent."""

        def reached() -> bool:
            row = self.shard(job_id)  # None until the job is split
            if row is None or row.status != ShardStatus.RUNNING:
                return False
            return row.lease_owner == worker.name and row.items_done >= items_done

        wait_for(reached, 120, f"{worker.name} to have {items_done} items of the shard done", interval=0.02)
        sent = time.monotonic()
        for n, sig in enumerate(signals):
            if n:
                time.sleep(0.3)
            worker.proc.send_signal(sig)
        return sent

    def worker_status(self, name: str) -> str:
        with session_scope(self.sessions) as s:
            rows = list_workers(s, 4.0)
        return next(w["status"] for w in rows if w["name"] == name)

    def live(self) -> list[str]:
        with session_scope(self.sessions) as s:
            return live_workers(s, QUEUE, 4.0)

    def artifacts(self, job_id: uuid.UUID) -> list[tuple[int, str, int]]:
        """(item_index, key, fencing_token) of the job's artifact rows."""
        with session_scope(self.sessions) as s:
            rows = s.execute(
                select(Artifact.item_index, Artifact.key, Artifact.fencing_token).where(Artifact.job_id == job_id)
            ).all()
        return sorted(tuple(r) for r in rows)

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()


@pytest.fixture
def drill(request, farm_factory, pg_url, tiny_models) -> Iterator[Any]:
    made: list[Drill] = []

    def make(broker: str = "redis", *, first: str, **env: str) -> Drill:
        url = request.getfixturevalue(f"{broker}_url")
        made.append(Drill(farm_factory, pg_url, url, tiny_models, first, **env))
        return made[-1]

    yield make
    for d in made:
        d.close()


def wait_exit(worker, within: float) -> tuple[int, float]:
    started = time.monotonic()
    try:
        code = worker.proc.wait(timeout=within + 30)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"{worker.name} did not exit:\n{worker.log.read_text(errors='replace')[-4000:]}")
    return code, time.monotonic() - started


def each_item_once(artifacts: list[tuple[int, str, int]], items: int) -> None:
    indexes, keys = [a[0] for a in artifacts], [a[1] for a in artifacts]
    assert sorted(indexes) == list(range(items)), artifacts
    assert len(set(keys)) == items, artifacts


# -- real workers --------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_sigterm_mid_shard_hands_back_and_another_worker_finishes(drill, broker, fault_table) -> None:
    row = fault_table.row(
        "Worker death",
        f"worker SIGTERMed mid-shard: the drain ({broker})",
        "SIGTERM after item 1 of a 4-item shard (3 s items); a second worker starts once the first has exited",
        "no new work at once (not a consumer any more), the shard handed back after the item in progress (items "
        "kept, no attempt counted), exit 0 within worker.drain_timeout_s; the second worker renders only the rest",
    )
    d = drill(broker, first="leaver")
    leaver = d.worker("leaver")
    items = 4
    job_id = d.submit(items, item_seconds=3.0)
    d.signal_after_item(leaver, job_id, 1, signal.SIGTERM)
    signalled = time.monotonic()

    # Deregistered at once: no queue's consumer while it finishes the item in progress.
    wait_for(lambda: d.worker_status("leaver") == "draining", 2, "the leaver to be marked draining", interval=0.05)
    assert leaver.proc.poll() is None, "still finishing its item"
    assert "leaver" not in d.live()
    with session_scope(d.sessions) as s:
        assert "leaver" not in [c.name for c in queue_consumers(s, 4.0).get(QUEUE, [])]
    assert d.shard(job_id).lease_owner == "leaver"

    code, _ = wait_exit(leaver, DRAIN_TIMEOUT_S)
    took = time.monotonic() - signalled
    log = leaver.log.read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert took < DRAIN_TIMEOUT_S, f"drained in {took:.1f} s"
    assert "'outcome': 'drained'" in log, log[-4000:]
    assert d.worker_status("leaver") == "stopped"

    back = d.shard(job_id)
    assert back.status in (ShardStatus.PENDING, ShardStatus.QUEUED), back  # fed again, nobody takes it yet
    assert back.lease_owner is None and back.attempts == 0 and not back.errors, back
    kept = back.items_done
    assert 1 <= kept < items, back  # the items done stay done
    assert len(d.artifacts(job_id)) == kept

    d.worker("finisher")
    summary = d.client.wait(job_id, timeout=120)
    assert summary["status"] == "succeeded", summary
    (shard,) = summary["shards"]
    assert shard["worker"] == "finisher" and shard["attempts"] == 1 and not shard["errors"], shard
    artifacts = d.artifacts(job_id)
    each_item_once(artifacts, items)
    tokens = [a[2] for a in artifacts]
    # The leaver's rows carry its fencing token and stay; the finisher's (the next token) are
    # exactly the items left: it skipped what the leaver had written.
    assert tokens.count(back.fencing_token) == kept and len(set(tokens)) == 2, artifacts
    print(f"{broker}: drained {took:.1f} s after SIGTERM, {kept}/{items} items kept, {items - kept} rendered after")
    row.observed = (
        f"marked draining at once; exit 0 {took:.1f} s after SIGTERM; shard back with {kept}/{items} items, "
        f"attempts {back.attempts}; the finisher rendered {items - kept} (attempt {shard['attempts']}); "
        f"{len(artifacts)} artifacts, one per item"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_on_the_last_item_finishes_the_shard_then_exits(drill) -> None:
    d = drill(first="last")
    worker = d.worker("last")
    items = 3
    job_id = d.submit(items, item_seconds=3.0)
    d.signal_after_item(worker, job_id, items - 1, signal.SIGTERM)
    code, took = wait_exit(worker, DRAIN_TIMEOUT_S)
    log = worker.log.read_text(errors="replace")
    assert code == 0 and took < DRAIN_TIMEOUT_S, log[-4000:]
    shard = d.shard(job_id)
    assert f"shard {shard.id} hands back after the item in progress" in log, "SIGTERM came mid-shard"
    assert (shard.status, shard.lease_owner, shard.attempts) == (ShardStatus.SUCCEEDED, "last", 1), shard
    assert "'outcome': 'drained'" not in log
    assert d.client.wait(job_id, timeout=60)["status"] == "succeeded"
    each_item_once(d.artifacts(job_id), items)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("how", ["second SIGTERM", "item longer than the bound"])
def test_a_forced_stop_leaves_the_shard_to_a_take_over(drill, how, fault_table) -> None:
    """The drain gives up: a second SIGTERM, or an item longer than ``worker.drain_timeout_s``.
    The worker exits 1 at once, its lease expired; another worker takes the shard over (the
    attempt counts, as after any lost worker)."""
    then = "SIGTERM again at once" if how == "second SIGTERM" else f"worker.drain_timeout_s {FORCED_BOUND_S:.0f} s"
    row = fault_table.row(
        "Worker death",
        f"drain cut short: {how}",
        f"SIGTERM after item 1 of 3 ({FORCED_ITEM_S:.0f} s items); {then}",
        "exit 1 at once (the second signal, or the bound), leases expired and the worker marked stopped; another "
        "worker takes the shard over and the job succeeds, each item once",
    )
    bound = FORCED_BOUND_S if how == "item longer than the bound" else float(DRAIN_TIMEOUT_S)
    d = drill(first="forced", FARM_WORKER__DRAIN_TIMEOUT_S=str(bound))
    worker = d.worker("forced")
    items = 3
    job_id = d.submit(items, item_seconds=FORCED_ITEM_S)
    signals = [signal.SIGTERM, signal.SIGTERM] if how == "second SIGTERM" else [signal.SIGTERM]
    d.signal_after_item(worker, job_id, 1, *signals)
    expected = 0.3 if how == "second SIGTERM" else bound  # the second signal, or the bound
    code, took = wait_exit(worker, expected)
    log = worker.log.read_text(errors="replace")
    assert code == 1, log[-4000:]
    assert took < expected + 8, f"stopped {took:.1f} s after the signal"
    assert "its lease is expired for another worker to take over" in log, log[-4000:]
    assert d.worker_status("forced") == "stopped"

    d.worker("rescuer")
    summary = d.client.wait(job_id, timeout=180)
    assert summary["status"] == "succeeded", summary
    (shard,) = summary["shards"]
    assert shard["worker"] == "rescuer" and shard["attempts"] == 2, shard
    assert any("lease expired" in e for e in shard["errors"]), shard
    each_item_once(d.artifacts(job_id), items)
    print(f"{how}: exit 1 {took:.1f} s after the signal; the rescuer took the shard over")
    row.observed = (
        f"exit 1 {took:.1f} s after the signal; registry 'stopped'; the rescuer ran attempt {shard['attempts']} and "
        f"the job succeeded; {len(d.artifacts(job_id))} artifacts, one per item"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_during_the_drain_still_ends_the_job(drill, fault_table) -> None:
    """An unlisted fault: the orchestrator's SIGKILL lands mid-drain. Nothing marks the row stopped
    or hands the shard back; the draining row is swept lost, its lease expires, the job ends."""
    row = fault_table.row(
        "Worker death",
        "SIGKILL during a drain",
        "SIGTERM after item 1 of 3 (3 s items), SIGKILL once the worker is marked draining; a second worker starts",
        "the job still ends: the lease expires, another worker finishes the shard (each item once), the draining "
        "worker is swept lost",
    )
    d = drill(first="victim")
    victim = d.worker("victim")
    items = 3
    job_id = d.submit(items, item_seconds=3.0)
    d.signal_after_item(victim, job_id, 1, signal.SIGTERM)
    wait_for(lambda: d.worker_status("victim") == "draining", 2, "the victim to be marked draining", interval=0.05)
    victim.kill()
    d.worker("rescuer")
    summary = d.client.wait(job_id, timeout=180)
    assert summary["status"] == "succeeded", summary
    (shard,) = summary["shards"]
    assert shard["worker"] == "rescuer", shard
    each_item_once(d.artifacts(job_id), items)
    wait_for(lambda: d.worker_status("victim") == "lost", 30, "the killed draining worker to be swept lost")
    row.observed = (
        f"job succeeded, the shard finished by the rescuer (attempt {shard['attempts']}, errors {shard['errors']}); "
        f"{len(d.artifacts(job_id))} artifacts for {items} items; the victim's row 'lost'"
    )


# -- the registry and the health check, without workers ------------------------------------------------------
@pytest.fixture
def sqlite_sessions(tmp_path) -> Iterator[Any]:
    from storage import migrate

    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield url, make_session_factory(engine)
    engine.dispose()


def test_a_draining_worker_is_nobodys_consumer_and_stays_draining(sqlite_sessions) -> None:
    _, sessions = sqlite_sessions
    with session_scope(sessions) as s:
        for name in ("a", "b"):
            register_worker(s, name=name, hostname="h", queues=[QUEUE], device="cpu")
        assert sorted(live_workers(s, QUEUE, 60)) == ["a", "b"]
        assert mark_draining(s, "a")
    with session_scope(sessions) as s:
        assert live_workers(s, QUEUE, 60) == ["b"]
        assert [c.name for c in queue_consumers(s, 60)[QUEUE]] == ["b"]
        # A heartbeat that read "not draining" just before the mark does not bring it back online.
        assert worker_heartbeat(s, "a")
        assert worker_heartbeat(s, "b", draining=False)
    with session_scope(sessions) as s:
        status = {name: st for name, st in s.execute(select(Worker.name, Worker.status))}
        assert status == {"a": WorkerStatus.DRAINING, "b": WorkerStatus.ONLINE}
        assert {w["name"]: w["status"] for w in list_workers(s, 60)} == {"a": "draining", "b": "online"}
    with session_scope(sessions) as s:
        stop_worker(s, "a")
        assert not mark_draining(s, "a")  # stopped is final for this process
        assert not worker_heartbeat(s, "a", draining=True)


def test_a_silent_draining_worker_is_swept_lost(sqlite_sessions) -> None:
    from datetime import timedelta

    from storage.models import utcnow

    _, sessions = sqlite_sessions
    with session_scope(sessions) as s:
        register_worker(s, name="quiet", hostname="h", queues=[QUEUE], device="cpu")
        mark_draining(s, "quiet")
    with session_scope(sessions) as s:
        assert sweep_lost_workers(s, 60, now=utcnow() + timedelta(seconds=120)) == ["quiet"]
    with session_scope(sessions) as s:
        assert s.scalar(select(Worker.status).where(Worker.name == "quiet")) == WorkerStatus.LOST


def test_healthcheck_says_a_draining_worker_is_not_ready(sqlite_sessions, tmp_path, monkeypatch, capsys) -> None:
    from tests.test_compose import DOCKER, load

    healthcheck = load(DOCKER / "healthcheck.py")
    url, sessions = sqlite_sessions
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FARM_DB__URL", url)
    with session_scope(sessions) as s:
        register_worker(s, name="me-1", hostname=socket.gethostname(), queues=[QUEUE], device="cpu")
    assert healthcheck.main(["worker"]) == 0
    with session_scope(sessions) as s:
        mark_draining(s, "me-1")
    assert healthcheck.main(["worker"]) == 1
    assert "me-1" in capsys.readouterr().out.split("draining")[0]
