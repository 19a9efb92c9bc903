"""Demand per GPU queue, from the database (:mod:`farm.demand`), and the worker count it asks for
(:mod:`farm.demand_policy`).

- the policy on its own: properties over random loads (hypothesis), then examples;
- the ``autoscale`` settings refuse unknown queue names;
- the figures read from real databases (SQLite and Postgres) for shards put in each state;
- on the real Redis broker with workers: the database counts every shard (pending, queued,
  running), where ``LLEN`` of the queue's key counts fewer (priority sub-lists, the message a
  worker holds, shards not yet sent), both numbers shown;
- a toy autoscaler that follows ``farm_queue_desired_workers`` on a real ``farm api``'s
  ``/metrics`` and starts and stops real worker processes scales 0 -> N -> 0 while a job runs,
  nothing lost, nothing twice; then the metrics text and ``farm status --queues`` through a pipe.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from farm.demand import queue_demands, read_loads
from farm.demand_policy import QueueLoad, ScalePolicy, desired_workers, workers_to_drain
from farm.errors import ConfigError
from farm.settings import FarmSettings, load_settings
from farm.sharding import WORK_QUEUES
from farm.specs import parse_spec
from storage.db import make_engine, make_session_factory, session_scope
from storage.leases import claim_shard, finish_shard
from storage.models import Artifact, BulkJob, Job, JobDependency, Shard, utcnow
from storage.registry import register_worker
from storage.status import ShardStatus
from storage.transitions import mark_shards_queued
from tests.fixtures.farm import ROOT, Farm, WorkerProcess, text_job
from tests.fixtures.noop_jobs import noop_spec

SD15 = "farm.gpu.sd15"
PROPERTIES = settings(max_examples=300, deadline=None)

pytestmark = pytest.mark.usefixtures("bench_kind")  # this module submits bench_noop jobs


# -- the policy, no database ------------------------------------------------------------------
@st.composite
def loads(draw: Any) -> tuple[QueueLoad, ScalePolicy]:
    pending, queued, running = (draw(st.integers(0, 40)) for _ in range(3))
    open_shards = pending + queued + running
    items_left = draw(st.integers(0, 8 * open_shards)) if open_shards else 0
    load = QueueLoad(
        queue=SD15,
        family="sd15",
        pending=pending,
        queued=queued,
        running=running,
        items_left=items_left,
        seconds_per_item=draw(st.floats(0.01, 120.0)),
        model_load_s=draw(st.floats(0.0, 900.0)),
        live_workers=draw(st.integers(0, 50)),
        idle_for_s=draw(st.none() | st.floats(0.0, 2000.0)),
    )
    policy = ScalePolicy(
        target_drain_s=draw(st.floats(1.0, 3600.0)),
        hold_down_s=draw(st.floats(0.0, 1000.0)),
        max_workers=draw(st.none() | st.integers(0, 30)),
    )
    return load, policy


def _capacity(n: int, load: QueueLoad, policy: ScalePolicy) -> float:
    """Seconds of items ``n`` workers render within the target, a model load per new worker."""
    return n * policy.target_drain_s - max(0, n - load.live_workers) * load.model_load_s


def _work(load: QueueLoad) -> float:
    return load.items_left * load.seconds_per_item


@PROPERTIES
@given(loads())
def test_desired_workers_properties(case: tuple[QueueLoad, ScalePolicy]) -> None:
    load, policy = case
    n = desired_workers(load, policy)
    cap = math.inf if policy.max_workers is None else policy.max_workers
    held = load.idle_for_s is not None and load.idle_for_s < policy.hold_down_s
    assert 0 <= n <= cap
    if load.open_shards == 0:  # nothing waits or runs: none, or the live ones while held down
        assert n == (min(load.live_workers, cap) if held else 0)
        return
    assert n >= min(cap, max(1, load.running)), "never fewer than the running shards, at least one"
    if held:
        assert n >= min(cap, load.live_workers), "the hold-down keeps the live workers"
    assert n <= max(load.open_shards, load.live_workers if held else 0), "one worker per open shard at most"
    floor = max(1, load.running, load.live_workers if held else 0)
    if floor < n < min(cap, load.open_shards):  # neither a floor, the cap nor the shards decided n
        slack = 1e-8 * policy.target_drain_s  # the policy's guard against float noise
        assert _capacity(n, load, policy) + slack >= _work(load), "n workers render the backlog within the target"
    if n > floor:
        assert _capacity(n - 1, load, policy) < _work(load), "and one fewer would not"


@PROPERTIES
@given(loads(), st.integers(1, 400))
def test_more_items_never_ask_for_fewer_workers(case: tuple[QueueLoad, ScalePolicy], more: int) -> None:
    load, policy = case
    bigger = replace(load, items_left=load.items_left + more, pending=load.pending + 1)
    assert desired_workers(bigger, policy) >= desired_workers(load, policy)


def test_desired_workers_examples() -> None:
    policy = ScalePolicy(target_drain_s=600, hold_down_s=300)
    idle = QueueLoad(SD15, "sd15")
    assert desired_workers(idle, policy) == 0, "an idle queue asks for none (scale to zero)"
    # 300 items at 10 s = 3000 s of work; from no worker, each new one loads for 60 s first:
    # 5 workers give 5 x 540 = 2700 s (too few), 6 give 3240 s.
    backlog = QueueLoad(SD15, "sd15", pending=100, items_left=300, seconds_per_item=10, model_load_s=60)
    assert desired_workers(backlog, policy) == 6
    # Four live workers already hold their model: 4 x 600 + 540 is short, 4 x 600 + 2 x 540 covers it;
    # five give 3000 s exactly; with six live, five are enough (one may go, once the hold-down is over).
    assert [desired_workers(replace(backlog, live_workers=live), policy) for live in (4, 5, 6)] == [6, 5, 5]
    # One shard only: one worker, however long it takes.
    assert desired_workers(QueueLoad(SD15, "sd15", pending=1, items_left=500, seconds_per_item=10), policy) == 1
    # Running shards keep their workers even when the backlog is small.
    assert desired_workers(QueueLoad(SD15, "sd15", running=4, items_left=4, seconds_per_item=1), policy) == 4
    # Hold-down: the job just ended, four workers are live: keep them, then let them go.
    ended = QueueLoad(SD15, "sd15", live_workers=4, idle_for_s=30)
    assert desired_workers(ended, policy) == 4
    assert desired_workers(replace(ended, idle_for_s=301), policy) == 0
    # A load longer than the target: as many workers as shards (each still helps eventually).
    slow = QueueLoad(SD15, "sd15", pending=7, items_left=70, seconds_per_item=10, model_load_s=900)
    assert desired_workers(slow, policy) == 7
    assert desired_workers(slow, ScalePolicy(600, 300, max_workers=3)) == 3, "the cap wins"
    assert workers_to_drain(0.0, 0, 600, 60) == 1
    assert workers_to_drain(1200.0, 2, 600, 60) == 2


# -- settings -----------------------------------------------------------------------------------
def test_autoscale_settings_name_a_bad_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_AUTOSCALE__MAX_WORKERS", '{"farm.gpu.sd51": 3}')
    with pytest.raises(ConfigError, match=r"autoscale\.max_workers.*unknown queue 'farm.gpu.sd51'.*farm.gpu.sd15"):
        load_settings(_env_file=None)
    monkeypatch.setenv("FARM_AUTOSCALE__MAX_WORKERS", '{"farm.gpu.sd15": -1}')
    with pytest.raises(ConfigError, match=r"autoscale\.max_workers\.farm\.gpu\.sd15"):
        load_settings(_env_file=None)
    monkeypatch.setenv("FARM_AUTOSCALE__MAX_WORKERS", '{"farm.gpu.sd15": 3}')
    monkeypatch.setenv("FARM_AUTOSCALE__QUEUE_TARGET_DRAIN_S", '{"farm.gpu.sdxl": 1200}')
    conf = load_settings(_env_file=None).autoscale
    assert conf.max_workers == {SD15: 3}
    assert (conf.target_for("farm.gpu.sdxl"), conf.target_for(SD15)) == (1200, conf.target_drain_s)
    monkeypatch.setenv("FARM_AUTOSCALE__QUEUE_TARGET_DRAIN_S", '{"sdxl": 1200}')
    with pytest.raises(ConfigError, match=r"autoscale\.queue_target_drain_s.*unknown queue 'sdxl'"):
        load_settings(_env_file=None)


# -- the figures, read from a real database -------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    from storage import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'farm.db'}"
    else:
        url = request.getfixturevalue("pg_database_factory")()
    migrate.upgrade(url)
    return url


def _job(session: Any, shards: int, family: str = "sd15") -> uuid.UUID:
    """A job of ``shards`` shards of 2 items, split (its shards PENDING)."""
    from farm.scheduler import create_shards, submit_job

    spec = parse_spec(text_job(Path("/models/tiny"), family, prompts=[f"p{i}" for i in range(shards)], count=2))
    job, _ = submit_job(session, spec)
    create_shards(session, job.id)
    return job.id


def _shards(session: Any, job_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(select(Shard.id).where(Shard.job_id == job_id).order_by(Shard.index)))


def test_figures_read_from_the_database(db_url: str, tmp_path: Path) -> None:
    conf = FarmSettings(
        _env_file=None,
        data_dir=tmp_path,
        db={"url": db_url},
        worker={"lost_after_s": 100_000},
        autoscale={"target_drain_s": 60, "hold_down_s": 300, "default_seconds_per_item": 7, "default_load_s": 5},
    )
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    t = utcnow() + timedelta(seconds=1000)  # the clock of this test: shards were made ~1000 s before
    try:
        with session_scope(sessions) as session:
            assert [load.open_shards for load in read_loads(session, conf, t)] == [0] * len(WORK_QUEUES)
            job = _job(session, 5)
            s0, s1, s2, s3, _ = _shards(session, job)
            lease = claim_shard(session, s0, "gpu-a", 600, now=t - timedelta(seconds=100))
            finish_shard(
                session,
                lease,
                ShardStatus.SUCCEEDED,
                timings={"load_s": 4.0, "model_loaded": 1.0},
                items_done=2,
                now=t - timedelta(seconds=60),
            )
            claim_shard(session, s1, "gpu-a", 600, now=t - timedelta(seconds=30))
            mark_shards_queued(session, [s2, s3])
            # A bulk run's job whose feeding window has closed: its PENDING shards will not be sent.
            late = _job(session, 3)
            owner, project = session.execute(select(Job.owner_id, Job.project_id).where(Job.id == late)).one()
            bulk = BulkJob(name="closed", base_spec={}, feed_until=utcnow(), owner_id=owner, project_id=project)
            session.add(bulk)
            session.flush()
            session.execute(update(Job).where(Job.id == late).values(bulk_id=bulk.id))
            # A job after `job` (still running): its PENDING shards wait for it and are not counted.
            blocked = _job(session, 2)
            session.add(JobDependency(job_id=blocked, upstream_id=job))
            register_worker(session, name="gpu-a", hostname="h", queues=[SD15], device="cpu", now=t)
            register_worker(session, name="gpu-b", hostname="h", queues=["farm.gpu.sdxl"], device="cpu", now=t)
        with session_scope(sessions) as session:
            demands = {d.load.queue: d for d in queue_demands(session, conf, t)}
        sd15 = demands[SD15].load
        assert (sd15.pending, sd15.queued, sd15.running, sd15.items_left) == (1, 2, 1, 8)
        assert 990 < sd15.oldest_waiting_s < 1100
        assert sd15.observed and sd15.seconds_per_item == pytest.approx((40 - 4) / 2)
        assert sd15.model_load_s == pytest.approx(4.0)
        assert sd15.live_workers == 1 and sd15.idle_for_s == pytest.approx(30, abs=0.01)
        # 8 items x 18 s = 144 s; gpu-a gives 60 s, each new worker 60 - 4 = 56 s: 1 + 2 workers.
        assert demands[SD15].desired_workers == 3
        sdxl = demands["farm.gpu.sdxl"]
        assert (sdxl.load.open_shards, sdxl.load.live_workers, sdxl.desired_workers) == (0, 1, 0)
        assert not sdxl.load.observed and sdxl.load.seconds_per_item == 7 and sdxl.load.model_load_s == 5

        with session_scope(sessions) as session:  # the job ends: the queue idles
            session.execute(
                update(Shard)
                .where(Shard.job_id == job, Shard.status != ShardStatus.SUCCEEDED)
                .values(status=ShardStatus.CANCELLED, finished_at=t)
            )
        for after, wanted in ((10, 1), (299, 1), (301, 0)):  # the hold-down keeps gpu-a, then lets it go
            with session_scope(sessions) as session:
                later = {d.load.queue: d for d in queue_demands(session, conf, t + timedelta(seconds=after))}
            assert later[SD15].load.open_shards == 0
            assert later[SD15].desired_workers == wanted, (after, later[SD15])
    finally:
        engine.dispose()


# -- real workers on Redis ------------------------------------------------------------------------


def redis_farm(farm_factory: Any, redis_url: str, db_url: str, **env: str) -> Farm:
    """A farm on Redis and its own Postgres database, with its control worker."""
    farm = farm_factory(
        broker=redis_url,
        db_url=db_url,
        FARM_SCHEDULING__PREEMPT="false",
        FARM_RECONCILE__INTERVAL_S="1",  # the windows grow soon after a worker joins
        **env,
    )
    farm.start_workers(["farm.control"], ["control"], module="bench.farm_worker")  # it splits bench_noop jobs
    return farm


def submit_bulk_class(farm: Farm, sessions: Any, spec: dict[str, Any]) -> uuid.UUID:
    """A job submitted as bulk work from the start (as a bulk run's jobs are): its shards go to
    the broker at the bulk priority, which on Redis is a sub-list of its own."""
    from farm.celery_app import create_app
    from farm.dispatch import publish_schedule
    from farm.scheduler import submit_job
    from storage.transitions import set_job_class

    with session_scope(sessions) as session:
        job, _ = submit_job(session, parse_spec(spec))
        set_job_class(session, job.id, "bulk")
        job_id = job.id
    publish_schedule(create_app(farm.settings()), job_id)
    return job_id


def _status_counts(sessions: Any, jobs: list[uuid.UUID]) -> dict[str, int]:
    with session_scope(sessions) as session:
        rows = session.execute(
            select(Shard.status, func.count()).where(Shard.job_id.in_(jobs)).group_by(Shard.status)
        ).all()
    return {ShardStatus(s).value: int(n) for s, n in rows}


@pytest.mark.integration
def test_the_database_counts_what_llen_misses(farm_factory, redis_url, pg_database_factory, tiny_models) -> None:
    import redis

    farm = redis_farm(farm_factory, redis_url, pg_database_factory())
    farm.start_workers([SD15], ["gpu-0"], module="bench.farm_worker")
    settings_ = farm.settings()
    engine = make_engine(settings_.database_url)
    sessions = make_session_factory(engine)
    broker = redis.Redis.from_url(redis_url)
    try:
        with farm.client() as client:
            bulk = submit_bulk_class(farm, sessions, noop_spec(tiny_models["sd15"], 5, 1, 3.0, "demand-bulk"))
            wait_for(lambda: _status_counts(sessions, [bulk]).get("running") == 1, "a bulk shard running")
            interactive = client.submit(noop_spec(tiny_models["sd15"], 5, 1, 3.0, "demand-interactive"))
            jobs = [bulk, interactive]
            wait_for(lambda: _status_counts(sessions, [interactive]).get("queued", 0) >= 1, "interactive shards sent")
            for _ in range(20):  # a moment when no shard changed state while both were read
                before = _status_counts(sessions, jobs)
                with session_scope(sessions) as session:
                    sd15 = next(d.load for d in queue_demands(session, settings_) if d.load.queue == SD15)
                keys = sorted(k.decode() for k in broker.scan_iter(match=f"{SD15}*") if broker.type(k) == b"list")
                lengths = {key: broker.llen(key) for key in keys}
                if _status_counts(sessions, jobs) == before:
                    break
            open_shards = sum(n for s, n in before.items() if s in ("pending", "queued", "running"))
            shown = (
                f"database: pending {sd15.pending} + queued {sd15.queued} + running {sd15.running} = "
                f"{sd15.open_shards} shards; LLEN {SD15!r} = {lengths.get(SD15, 0)}, every sub-list: {lengths}, "
                f"held by workers (unacked): {broker.hlen('unacked')}"
            )
            print(shown)
            assert sd15.open_shards == open_shards == 10 - before.get("succeeded", 0), shown
            assert sd15.pending > 0 and sd15.running == 1, shown  # shards kept back, a message held by the worker
            assert f"{SD15}:9" in lengths and lengths.get(SD15, 0) > 0, f"both priorities on the broker: {shown}"
            assert lengths.get(SD15, 0) < sd15.open_shards, shown
            assert sum(lengths.values()) < sd15.open_shards, shown
            client.cancel(bulk)
            client.cancel(interactive)
    finally:
        engine.dispose()


def wait_for(check: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed (by prometheus_client's own parser): (name, labels) -> value."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def desired(metrics: dict, queue: str = SD15) -> int:
    return int(metrics[("farm_queue_desired_workers", (("queue", queue),))])


class ToyAutoscaler:
    """What KEDA does for a worker Deployment, in a loop: read ``farm_queue_desired_workers``
    from ``/metrics`` and start or stop (SIGTERM: Celery's warm shutdown) worker processes to
    match."""

    def __init__(self, farm: Farm, api_url: str) -> None:
        self.farm, self.url = farm, api_url
        self.running: list[WorkerProcess] = []
        self.stopping: list[WorkerProcess] = []
        self.started = 0
        self.most = 0
        self.seen: list[int] = []

    def step(self) -> int:
        want = desired(scrape(self.url))
        self.seen.append(want)
        while len(self.running) < want:
            name = f"auto-{self.started}"
            self.started += 1
            log = self.farm.tmp_path / f"{name}.log"
            worker = WorkerProcess(self.farm.env, [SD15], name, log, module="bench.farm_worker")
            self.farm.workers.append(worker)  # the fixture stops it, should the test fail
            self.running.append(worker)
        while len(self.running) > want:
            worker = self.running.pop()
            worker.proc.send_signal(signal.SIGTERM)
            self.stopping.append(worker)
        self.stopping = [w for w in self.stopping if w.proc.poll() is None]
        self.most = max(self.most, len(self.running))
        return want

    @property
    def alive(self) -> int:
        return sum(1 for w in self.running + self.stopping if w.proc.poll() is None)


@pytest.mark.integration
def test_a_toy_autoscaler_scales_zero_to_n_to_zero(
    farm_factory, redis_url, pg_database_factory, tiny_models, api_server_factory
) -> None:
    from tests.fixtures.api import add_person

    autoscale = {
        "FARM_AUTOSCALE__TARGET_DRAIN_S": "4",
        "FARM_AUTOSCALE__DEFAULT_SECONDS_PER_ITEM": "1",
        "FARM_AUTOSCALE__DEFAULT_LOAD_S": "1",
        "FARM_AUTOSCALE__HOLD_DOWN_S": "3",
        "FARM_AUTOSCALE__MAX_WORKERS": '{"farm.gpu.sd15": 3}',
    }
    farm = redis_farm(farm_factory, redis_url, pg_database_factory(), **autoscale)
    server = api_server_factory(farm)
    scaler = ToyAutoscaler(farm, server.url)
    assert scaler.step() == 0 and scaler.alive == 0, "an idle queue is exported, at zero"

    with farm.client() as client:
        job = client.submit(noop_spec(tiny_models["sd15"], 6, 2, 1.0, "demand-autoscale"))
        deadline = time.monotonic() + 300
        while True:
            want = scaler.step()
            ended = client.get(job, shards=0)["status"] in ("succeeded", "failed", "partial", "cancelled")
            if ended and want == 0 and scaler.alive == 0:
                break
            assert time.monotonic() < deadline, f"no scale back to zero; desired seen: {scaler.seen[-20:]}"
            time.sleep(0.5)
        summary = client.get(job, shards="all")

    print(f"desired workers seen: {scaler.seen}; most workers at once: {scaler.most}; started: {scaler.started}")
    assert summary["status"] == "succeeded", summary
    assert scaler.most >= 2, "it scaled out beyond one worker"
    assert scaler.seen[0] == 0 and scaler.seen[-1] == 0 and max(scaler.seen) == 3  # 0 -> N (the cap) -> 0
    shards = summary["shards"]
    assert [(s["status"], s["attempts"], s["errors"]) for s in shards] == [("succeeded", 1, [])] * 6
    engine = make_engine(farm.settings().database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            made = session.execute(select(Artifact.item_index, Artifact.key).where(Artifact.job_id == job)).all()
    finally:
        engine.dispose()
    assert sorted(index for index, _ in made) == list(range(12)), "every item once, none twice"
    assert len({key for _, key in made}) == 12

    # The metrics text as a scraper gets it, then `farm status --queues` through a pipe.
    metrics = scrape(server.url)
    for queue in WORK_QUEUES:
        q = (("queue", queue),)
        assert desired(metrics, queue) == 0 and metrics[("farm_queue_live_workers", q)] == 0
        assert metrics[("farm_queue_items_left", q)] == 0
        assert metrics[("farm_queue_oldest_waiting_seconds", q)] == 0
        for status in ("pending", "queued", "running"):
            assert metrics[("farm_queue_shards", (("queue", queue), ("status", status)))] == 0
    measured = metrics[("farm_queue_seconds_per_item", (("queue", SD15),))]
    assert measured >= 1.0, "measured on the shards: each item sleeps 1 s"
    loads = [s["timings"]["load_s"] for s in shards if s["timings"].get("model_loaded")]
    assert 1 <= len(loads) <= scaler.started, "each worker loaded the model once, for its first shard"
    load_metric = metrics[("farm_queue_model_load_seconds", (("queue", SD15),))]
    assert load_metric == pytest.approx(sum(loads) / len(loads), rel=1e-3), "measured, not the default"
    assert all(w.proc.returncode == 0 for w in farm.workers if w.name.startswith("auto-")), "each stopped cleanly"

    direct = farm_cli(["status", "--queues"], farm.env)
    person = add_person(farm, server, "viewer-vi", "viewer", project="default")
    through_api = farm_cli(["status", "--queues"], person.env())
    for out in (direct, through_api):
        lines = out.strip().splitlines()
        assert lines[0] == "queue\tpending\tqueued\trunning\titems left\toldest\ts/item\tload\tlive\tdesired"
        rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
        assert set(rows) == set(WORK_QUEUES), "every GPU queue and farm.cpu"
        assert rows[SD15][1:6] == ["0", "0", "0", "0", "-"] and rows[SD15][8:] == ["0", "0/3"]
        assert not rows[SD15][6].endswith("*") and rows["farm.gpu.sdxl"][6] == "1.00*"
    assert direct == through_api
    as_json = farm_cli(["status", "--queues", "--json"], person.env())
    assert '"desired_workers": 0' in as_json and '"observed": true' in as_json

    import httpx

    assert httpx.get(server.url + "/v1/queues", timeout=10).status_code == 401, "signed-in users only"


def farm_cli(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "farm", *args],
        env={**env, "COLUMNS": "60", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout
