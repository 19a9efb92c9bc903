"""Farm overhead vs bare Celery: no-op shards through the farm's full path vs no-op Celery tasks.

For each broker (Redis, RabbitMQ), on a scratch Postgres database, a scratch Redis db (task end
times, and the result backend of the Redis runs) and, for RabbitMQ, a scratch vhost:

- **farm**: ``--workers`` real worker processes, ``python -m bench.farm_worker`` (exactly
  ``farm worker``: one task at a time on a pool thread, ``farm.control`` + ``farm.gpu.sd15``, a
  tiny SD1.5 model pinned with ``--preload``, plus the bench-only ``bench_noop`` job kind, see
  :mod:`bench.noop_kind`). One job of ``--tasks`` shards (one item each) is submitted with
  ``FarmClient.submit`` and timed until the job row's ``finished_at``: ``farm.schedule_job`` (spec
  parsed, shards inserted and published), every shard claimed under a lease, its "render" (an 8x8
  PNG written to the local object store + artifact row + fenced lease renewal), finished,
  ``farm.finalize_job`` per shard (roll-up; the last one writes the manifest and the contact sheet).
- **bare** (the baseline): the same number of workers, ``python -m bench.bare_celery``: a plain
  Celery app with the farm app's Celery settings (see :mod:`bench.bare_celery`), same pool
  and flags, one no-op task that records its end time in Redis; ``--tasks`` tasks sent by this
  process, timed until the last task's end.

Runs alternate (bare, farm, farm, bare, ...) ``--repeats`` times after a warm-up; medians of
tasks/s and their ratio. End times come from the workers, so this process polls only every 0.1 s
(a tight poll takes CPU from the workers on a small machine). A *stall* is a worker idle for more
than 0.5 s between two of its tasks with work queued (1-2 s gaps on RabbitMQ, bare and farm alike,
while workers ran the solo pool: see bench/README.md); the rates without the stalled time are
printed beside the raw ones (exact for one worker per kind). Then, unless ``--no-breakdown``: one
more farm run with a Celery event receiver in this process gives the worker-side runtime of each
farm task (render_shard, finalize_job, schedule_job; that run's rate is shown but not used: the
receiver costs CPU), and the farm's code for one more job runs in this process without a broker
(``execute_shard`` and the finalize roll-up, as the tasks call them), timed, with its SQL counted
per shard. With the shard rows' timestamps and timings that says where a shard's time goes.

    python -m bench.celery_overhead                                # both brokers, 300 tasks, 3 repeats
    python -m bench.celery_overhead --broker redis --tasks 1000 --workers 2

``--json FILE`` writes the figures. Needs Postgres (``--pg-admin``), Redis (``--redis-url``: an
empty db, flushed at the end) and for RabbitMQ ``rabbitmqctl`` (or ``--rabbitmq-url``: an empty
vhost of your own).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.services import (
    PG_ADMIN,
    RABBITMQ,
    REDIS_URL,
    WorkerProcess,
    scratch_postgres,
    scratch_rabbitmq,
    scratch_redis,
    stop_all,
    wait_ready,
    worker_env,
)

FARM_QUEUES = "farm.control,farm.gpu.sd15"
POLL_S = 0.1  # end times come from the workers (task end times, the job row): the poll can be slow
STALL_S = 0.5  # a gap between two tasks on one worker longer than this is a stall
TIMINGS = ("upload_s", "load_s", "patch_s")  # from the shard rows' timings
PER_SHARD = (  # medians over the farm runs
    "claim_to_finish_ms",
    "finish_to_next_claim_ms",
    "claim_to_finish_share",
    "upload_ms",
    "load_ms",
    "patch_ms",
    "schedule_s",
    "first_claim_s",
    "finalize_tail_s",
    "control_queued_at_final",
)


def stalls(gaps: list[float]) -> dict[str, Any]:
    """Idle gaps between consecutive tasks of one worker longer than :data:`STALL_S`."""
    long = [g for g in gaps if g > STALL_S]
    return {"stalls": len(long), "stalled_s": sum(long), "longest_gap_s": max(gaps, default=0.0)}


# -- task runtimes from Celery events ------------------------------------------------------------
class TaskClock:
    """Worker-side runtimes by task name, from the task events every worker sends (``task-received``
    names the task, ``task-succeeded`` carries its runtime), collected by a receiver thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.names: dict[str, str] = {}
        self.runtimes: dict[str, list[float]] = {}
        self.receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="bench-events", daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            handlers = {"task-received": self._received, "task-succeeded": self._succeeded}
            self.receiver = self.app.events.Receiver(conn, handlers=handlers)
            self._ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _received(self, event: dict[str, Any]) -> None:
        self.names[event["uuid"]] = event["name"]

    def _succeeded(self, event: dict[str, Any]) -> None:
        name = self.names.get(event["uuid"], "unknown")
        self.runtimes.setdefault(name, []).append(float(event.get("runtime") or 0.0))

    def __enter__(self) -> TaskClock:
        self._thread.start()
        self._ready.wait(10)
        time.sleep(1.0)  # the receiver's queue is bound once capture() has started
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.0)  # the last task-succeeded events
        if self.receiver is not None:
            self.receiver.should_stop = True
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name.rpartition(".")[2]: {
                "count": len(v),
                "median_ms": 1000 * statistics.median(v),
                "mean_ms": 1000 * statistics.fmean(v),
                "total_s": sum(v),
            }
            for name, v in sorted(self.runtimes.items())
        }


# -- one broker ------------------------------------------------------------------------------------
class Rig:
    """Scratch services, worker processes and the two ways to run N no-op tasks, for one broker."""

    def __init__(self, broker: str, args: argparse.Namespace, model: Path, tmp: Path, stack: ExitStack) -> None:
        import bench.noop_kind  # noqa: F401  (this process submits bench_noop jobs)
        from bench import bare_celery
        from farm.client import FarmClient
        from farm.settings import FarmSettings

        self.broker, self.args, self.model, self.tmp = broker, args, model, tmp / broker
        self.tmp.mkdir(parents=True)
        db_url = stack.enter_context(scratch_postgres(args.pg_admin))
        self.redis_url = stack.enter_context(scratch_redis(args.redis_url))
        if broker == "redis":
            broker_url = self.redis_url
        elif args.rabbitmq_url:
            broker_url = args.rabbitmq_url
        else:
            broker_url = stack.enter_context(scratch_rabbitmq(RABBITMQ))
        data = self.tmp / "farm-data"
        self.settings = FarmSettings(
            _env_file=None, data_dir=data, db={"url": db_url}, broker={"url": broker_url}, worker={"device": "cpu"}
        )
        self.client = FarmClient(self.settings)
        stack.callback(self.client.close)
        self.bare = bare_celery.make_app(self.settings)
        stack.callback(self.bare.close)
        import redis

        self.counter = redis.Redis.from_url(self.redis_url)
        stack.callback(self.counter.close)
        self.bare_module = bare_celery
        env = worker_env(data, db_url, broker_url, FARM_WORKER__DEVICE="cpu", BENCH_COUNTER_URL=self.redis_url)
        self.workers: list[WorkerProcess] = []
        stack.callback(stop_all, self.workers)

        def farm_args(i: int) -> list[str]:
            name = ["--queues", FARM_QUEUES, "--name", f"bench-farm-{i}"]
            return [*name, "--preload", f"sd15:{model}", "--loglevel", args.loglevel]

        started = time.perf_counter()
        farm = [
            WorkerProcess(
                "bench.farm_worker",
                farm_args(i),
                f"bench-farm-{i}",
                env,
                self.tmp / f"farm-{i}.log",
            )
            for i in range(args.workers)
        ]
        bare = [
            WorkerProcess(
                "bench.bare_celery",
                ["--name", f"bench-bare-{i}", "--loglevel", args.loglevel],
                f"bench-bare-{i}",
                env,
                self.tmp / f"bare-{i}.log",
            )
            for i in range(args.workers)
        ]
        self.workers.extend(farm + bare)
        wait_ready(self.bare, bare)
        self.bare_start_s = time.perf_counter() - started
        wait_ready(self.client.app, farm)
        self.farm_start_s = time.perf_counter() - started

    def _deadline_check(self, started: float, what: str) -> None:
        for worker in self.workers:
            worker.check_alive()
        if time.perf_counter() - started > self.args.timeout:
            tails = "\n".join(w.tail(1500) for w in self.workers)
            raise RuntimeError(f"{self.broker}: {what} not done after {self.args.timeout:.0f}s\n{tails}")

    # -- the baseline ------------------------------------------------------------------------------
    def bare_run(self, n: int) -> dict[str, Any]:
        key = self.bare_module.DONE_KEY
        self.counter.delete(key)
        started, wall = time.perf_counter(), time.time()
        for _ in range(n):
            self.bare.send_task(self.bare_module.TASK, queue=self.bare_module.QUEUE)
        send_s = time.perf_counter() - started
        while self.counter.llen(key) < n:
            self._deadline_check(started, f"{n} bare tasks")
            time.sleep(POLL_S)
        ends = sorted(float(t) for t in self.counter.lrange(key, 0, -1))
        seconds = ends[-1] - wall  # the first send -> the last task's end (worker clock, same host)
        gaps = [b - a for a, b in itertools.pairwise(ends)]  # one worker: one task's end -> the next one's
        idle = stalls(gaps)
        unstalled = n / max(seconds - idle["stalled_s"], 1e-9)
        rates = {"tasks_per_s": n / seconds, "unstalled": unstalled}
        return {"tasks": n, "seconds": seconds, **rates, "send_s": send_s, **idle}

    # -- the farm ----------------------------------------------------------------------------------
    def noop_spec(self, n: int) -> dict[str, Any]:
        return {
            "kind": "bench_noop",
            "model": str(self.model),
            "family": "sd15",
            "prompts": ["a no-op render"],
            "base_seed": 0,
            "count": n,
            "steps": 1,
            "width": 64,
            "height": 64,
            "shard_size": 1,
            "output_prefix": "bench",
        }

    def farm_run(self, n: int) -> dict[str, Any]:
        from sqlalchemy import select

        from storage.models import Job
        from storage.status import JOB_TERMINAL, JobStatus

        started, wall = time.perf_counter(), time.time()
        job_id = self.client.submit(self.noop_spec(n))
        query = select(Job.status, Job.finished_at).where(Job.id == job_id)
        with self.client._engine.connect() as conn:  # one kept connection, one light query per poll
            while True:
                row = conn.execute(query).one()
                conn.rollback()
                if JobStatus(row.status) in JOB_TERMINAL:
                    break
                self._deadline_check(started, f"farm job of {n} shards")
                time.sleep(POLL_S)
        if JobStatus(row.status) != JobStatus.SUCCEEDED:
            raise RuntimeError(f"{self.broker}: bench job {job_id} ended {row.status}")
        seconds = row.finished_at.timestamp() - wall  # submit -> the job's final state (worker clock)
        leftover = self.settle(started)
        stats = self.shard_stats(job_id, n)
        unstalled = n / max(seconds - stats["stalled_s"] / self.args.workers, 1e-9)
        rates = {"shards_per_s": n / seconds, "unstalled": unstalled}
        return {"shards": n, "seconds": seconds, **rates, "control_queued_at_final": leftover, **stats}

    def _depth(self, conn: Any, queue: str) -> int:
        """Messages waiting in ``queue`` (on Redis: its list and its priority lists)."""
        if self.broker == "redis":
            keys = [queue, *(f"{queue}:{p}" for p in range(1, 10))]  # the farm's priority steps, sep ":"
            return sum(self.counter.llen(key) for key in keys)
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count

    def settle(self, started: float) -> int:
        """Wait until ``farm.control`` is empty; returns how many messages it held when the job
        was seen final. Finalize tasks queued behind the one that ended the job still run (each
        rewrites the manifest); waiting keeps them out of the next timed run."""
        from farm.celery_app import CONTROL_QUEUE

        first = None
        with self.client.app.connection_for_write() as conn:
            while True:
                depth = self._depth(conn, CONTROL_QUEUE)
                first = depth if first is None else first
                if depth == 0:
                    break
                self._deadline_check(started, "the control queue to drain")
                time.sleep(POLL_S)
        time.sleep(0.2)  # the last one taken may still be running
        return first

    def shard_stats(self, job_id: uuid.UUID, n: int) -> dict[str, Any]:
        """Where the shards' time went, from the job's rows (worker clocks, same host)."""
        from sqlalchemy import func, select

        from storage.models import Artifact, Job, Shard

        with self.client._sessions() as session:
            job = session.get(Job, job_id)
            shards = session.execute(
                select(Shard.started_at, Shard.finished_at, Shard.timings, Shard.attempts, Shard.lease_owner).where(
                    Shard.job_id == job_id
                )
            ).all()
            artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
        if artifacts != n or len(shards) != n:
            raise RuntimeError(f"{self.broker}: job {job_id} has {len(shards)} shards, {artifacts} artifacts; not {n}")

        def med(values: list[float]) -> float:
            return statistics.median(values) if values else 0.0

        in_shard = [(s.finished_at - s.started_at).total_seconds() for s in shards]
        timing = {k: med([float((s.timings or {}).get(k, 0.0)) for s in shards]) for k in TIMINGS}
        first_start = min(s.started_at for s in shards)
        last_finish = max(s.finished_at for s in shards)
        gaps = []  # on each worker: one shard's finish -> its next claim (Celery, finalize, pre-claim reads)
        for owner in {s.lease_owner for s in shards}:
            mine = sorted((s for s in shards if s.lease_owner == owner), key=lambda s: s.started_at)
            gaps += [(b.started_at - a.finished_at).total_seconds() for a, b in itertools.pairwise(mine)]
        return {
            **stalls(gaps),
            "claim_to_finish_ms": 1000 * med(in_shard),
            "finish_to_next_claim_ms": 1000 * med(gaps),
            "claim_to_finish_share": sum(in_shard) / max((last_finish - first_start).total_seconds(), 1e-9),
            "upload_ms": 1000 * timing["upload_s"],
            "load_ms": 1000 * timing["load_s"],
            "patch_ms": 1000 * timing["patch_s"],
            "schedule_s": (job.started_at - job.created_at).total_seconds(),
            "first_claim_s": (first_start - job.created_at).total_seconds(),
            "finalize_tail_s": (job.finished_at - last_finish).total_seconds(),
            "retried_shards": sum(1 for s in shards if s.attempts > 1),
        }

    def breakdown(self, n: int) -> dict[str, Any]:
        with TaskClock(self.client.app) as clock:
            run = self.farm_run(n)
        return {"events_run": run, "tasks": clock.summary(), "in_process": self.in_process(n)}

    def in_process(self, n: int) -> dict[str, Any]:
        """The farm's code for a job of ``n`` no-op shards in this process, without a broker: what
        the tasks call (``schedule_job``; per shard ``execute_shard``, then ``finalize`` when the
        outcome asks for it, as ``farm.shard_delivery.follow_up`` sends it), timed, with the SQL it
        sends counted (events on this process's own engine): statements by verb, commits, and the
        write transactions (a commit after an INSERT, UPDATE or DELETE)."""
        from sqlalchemy import event

        from farm.finalizer import finalize
        from farm.scheduler import schedule_job, submit_job
        from farm.specs import parse_spec
        from farm.worker.resources import WorkerResources
        from farm.worker.runtime import execute_shard
        from storage.db import session_scope

        res = WorkerResources.create(self.settings, name="bench-in-process")
        counts: dict[str, int] = {}

        def count(what: str) -> None:
            counts[what] = counts.get(what, 0) + 1

        def statement(conn: Any, cursor: Any, text: str, *args: Any) -> None:
            verb = text.split()[0].upper()
            count(verb)
            if verb in ("INSERT", "UPDATE", "DELETE"):
                conn.info["wrote"] = True

        def commit(conn: Any) -> None:
            count("COMMIT")
            if conn.info.pop("wrote", False):
                count("write transactions")

        event.listen(res.engine, "before_cursor_execute", statement)
        event.listen(res.engine, "commit", commit)
        event.listen(res.engine, "checkout", lambda *a: count("checkout"))
        try:
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
            res.model_cache().get(str(self.model), "sd15")
            with session_scope(res.session_factory) as session:
                job_id = submit_job(session, parse_spec(self.noop_spec(n)))[0].id
            with session_scope(res.session_factory) as session:
                dispatches = schedule_job(session, job_id)
            counts.clear()
            execute: list[float] = []
            finalized: list[float] = []
            for dispatch in dispatches:
                started = time.perf_counter()
                outcome = execute_shard(res, dispatch.shard_id, job_id=job_id)
                execute.append(time.perf_counter() - started)
                if outcome.status != "succeeded":
                    raise RuntimeError(f"in-process shard {dispatch.shard_id}: {outcome.status} {outcome.error}")
                if outcome.finalize:  # what farm.finalize_job does (its bulk feed aside)
                    started = time.perf_counter()
                    finalize(res.session_factory, res.store, job_id)
                    finalized.append(time.perf_counter() - started)
        finally:
            res.close()
        return {
            "shards": n,
            "execute_shard_ms": {"median": 1000 * statistics.median(execute), "mean": 1000 * statistics.fmean(execute)},
            "finalizes": len(finalized),
            "finalize_ms": {"median": 1000 * statistics.median(finalized or [0.0]), "last": 1000 * finalized[-1]},
            "per_shard": {k: v / n for k, v in sorted(counts.items())},
        }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_broker(broker: str, args: argparse.Namespace, model: Path, tmp: Path) -> dict[str, Any]:
    from farm.celery_app import WORKER_CONCURRENCY, WORKER_POOL

    with ExitStack() as stack:
        rig = Rig(broker, args, model, tmp, stack)
        rig.bare_run(args.warmup * 5)
        rig.farm_run(args.warmup)
        bare: list[dict[str, Any]] = []
        farm: list[dict[str, Any]] = []
        for i in range(args.repeats):  # alternate the order: bare, farm, farm, bare, ...
            for name in ("bare", "farm") if i % 2 == 0 else ("farm", "bare"):
                if name == "bare":
                    bare.append(rig.bare_run(args.tasks))
                else:
                    farm.append(rig.farm_run(args.tasks))
        breakdown = None if args.no_breakdown else rig.breakdown(args.tasks)
        start = {"farm_s": rig.farm_start_s, "bare_s": rig.bare_start_s}
    bare_rate, farm_rate = _median(bare, "tasks_per_s"), _median(farm, "shards_per_s")
    per_shard = {key: _median(farm, key) for key in PER_SHARD}
    stall = {
        name: {
            "stalls": sum(r["stalls"] for r in runs),
            "stalled_s": sum(r["stalled_s"] for r in runs),
            "per_s_without_stalls": _median(runs, "unstalled"),
        }
        for name, runs in (("bare", bare), ("farm", farm))
    }
    without = stall["farm"]["per_s_without_stalls"] / stall["bare"]["per_s_without_stalls"]
    stall["farm_over_bare_without_stalls"] = without
    return {
        "broker": broker,
        "tasks": args.tasks,
        "workers": args.workers,
        "bare": {"tasks_per_s": bare_rate, "ms_per_task": 1000 / bare_rate, "runs": bare},
        "farm": {"shards_per_s": farm_rate, "ms_per_shard": 1000 / farm_rate, "per_shard": per_shard, "runs": farm},
        "farm_over_bare": farm_rate / bare_rate,
        "farm_extra_ms_per_shard": 1000 / farm_rate - 1000 / bare_rate,
        "stalls": stall,
        "breakdown": breakdown,
        "worker_start": start,
        "pool": f"{WORKER_POOL}, concurrency {WORKER_CONCURRENCY}",
    }


def print_result(r: dict[str, Any]) -> None:
    b, f, p = r["bare"], r["farm"], r["farm"]["per_shard"]
    print(f"{r['broker']}: {r['tasks']} tasks, {r['workers']} worker(s) of each kind (pool: {r['pool']})")
    print(f"  bare Celery   {b['tasks_per_s']:8.1f} tasks/s   {b['ms_per_task']:6.2f} ms/task")
    print(f"  farm no-op    {f['shards_per_s']:8.1f} shards/s  {f['ms_per_shard']:6.2f} ms/shard")
    print(
        f"  farm / bare   {r['farm_over_bare']:.1%} of the bare rate; the farm adds "
        f"{r['farm_extra_ms_per_shard']:.2f} ms per shard"
    )
    print(
        f"  per shard (medians of the rows): claim -> finish {p['claim_to_finish_ms']:.2f} ms "
        f"({p['claim_to_finish_share']:.0%} of the workers' time; upload = store + artifact row "
        f"{p['upload_ms']:.2f} ms, model cache {p['load_ms']:.2f} ms, patches {p['patch_ms']:.2f} ms), "
        f"finish -> next claim {p['finish_to_next_claim_ms']:.2f} ms"
    )
    print(
        f"  per job: submit -> scheduled {p['schedule_s']:.3f} s, -> first claim {p['first_claim_s']:.3f} s, "
        f"last shard -> job final {p['finalize_tail_s']:.3f} s; control messages still queued when the job "
        f"turned final: {p['control_queued_at_final']:.0f} (they run after it)"
    )
    st = r["stalls"]
    if st["bare"]["stalls"] or st["farm"]["stalls"]:
        sb, sf = st["bare"], st["farm"]
        print(
            f"  stalls (a worker idle > {STALL_S} s between two tasks), all timed runs: bare {sb['stalls']} "
            f"({sb['stalled_s']:.1f} s), farm {sf['stalls']} ({sf['stalled_s']:.1f} s); without them: bare "
            f"{sb['per_s_without_stalls']:.1f}/s, farm {sf['per_s_without_stalls']:.1f}/s, farm / bare "
            f"{st['farm_over_bare_without_stalls']:.1%}"
        )
    bd = r["breakdown"]
    if bd is not None:
        tasks, run = bd["tasks"], bd["events_run"]
        parts = ", ".join(f"{name} {t['median_ms']:.2f} ms x{t['count']}" for name, t in tasks.items())
        bodies = sum(t["total_s"] for t in tasks.values()) / run["shards"]
        print(
            f"  task runtimes (events pass, {run['shards_per_s']:.1f} shards/s with the receiver): {parts}; "
            f"{1000 * bodies:.2f} ms of task bodies per shard of {1000 / run['shards_per_s']:.2f} ms"
        )
        ip = bd["in_process"]
        sql = ", ".join(f"{k} {v:.2f}" for k, v in ip["per_shard"].items())
        print(
            f"  in process, no broker: execute_shard {ip['execute_shard_ms']['median']:.2f} ms (median), "
            f"{ip['finalizes']} finalizes for {ip['shards']} shards ({ip['finalize_ms']['median']:.2f} ms median); "
            f"per shard: {sql}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both")
    parser.add_argument("--tasks", type=int, default=300, help="no-op shards (farm) and tasks (bare) per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="worker processes of each kind")
    parser.add_argument("--warmup", type=int, default=10, help="shards of the warm-up job (x5 bare tasks)")
    parser.add_argument("--loglevel", default="WARNING", help="worker log level (both kinds)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the task-events pass")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="Postgres URL allowed to CREATE DATABASE")
    parser.add_argument("--redis-url", default=REDIS_URL, help="an empty Redis db (flushed at the end)")
    parser.add_argument("--rabbitmq-url", default=None, help="an empty vhost to use instead of a scratch one")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.tasks, args.repeats, args.workers = max(1, args.tasks), max(1, args.repeats), max(1, args.workers)
    args.warmup = max(1, args.warmup)
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-celery-") as tmp_s:
        tmp = Path(tmp_s)
        from farm.tiny_models import build_tiny_model

        model = build_tiny_model("sd15", tmp / "tiny-sd15")
        for broker in brokers:
            result = bench_broker(broker, args, model, tmp)
            print_result(result)
            results.append(result)
    out = {"tasks": args.tasks, "repeats": args.repeats, "workers": args.workers, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
