"""Bulk renders: expanding a manifest into shards, and feeding them a window at a time vs publishing them all.

For each row count, on a real database and broker (a scratch Postgres database and Redis db 15 by
default; ``--embedded``: a temporary SQLite file and the kombu filesystem broker):

1. Expansion: ``read_manifest`` of generated JSONL bytes, then ``submit_bulk`` + commit (rows/s).
2. Feeding: simulated workers without rendering. Loop: ``feed(app, factory, settings, [queue])``
   with ``scheduling.window_per_queue`` = ``--window`` (the feeder's own call: pick, publish
   through Celery, mark queued), sample the broker depth of the ``farm.gpu.sd15`` queue and the
   shards in flight, then ``--batch`` workers each take one message off the broker (in the order
   a worker would), claim the shard and finish it as SUCCEEDED (``claim_shard`` +
   ``finish_shard``, one transaction per batch); until every shard is done. Shards fed per second
   of ``feed`` time, feed calls, most messages on the broker, most shards in flight (never above
   the window), and where the feeder's time goes (SQL vs the rest).
3. Baseline, same run and database: the shards reset to PENDING, then what a non-windowed
   scheduler does (the ``farm.schedule_job`` path: ``schedule_job`` of each job returns every
   pending shard, ``publish_shards`` sends them all, ``mark_shards_queued``): its time and broker
   depth (every shard at once).
4. Memory, in a second pass on a fresh database under ``tracemalloc`` (its timings are not
   reported): peak Python memory of read + submit ("scheduler memory") and the most one
   ``feed`` call allocates.

    python -m bench.bulk_feed --rows 10000 100000            # Postgres at 127.0.0.1:5432, Redis db 15
    python -m bench.bulk_feed --embedded --rows 200 --window 8

``--json FILE`` writes the figures. The scratch databases and the Redis db are emptied at the end
(the Redis db must be empty at the start).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

QUEUE = "farm.gpu.sd15"
PRIORITY_STEPS = range(10)
BASE = {
    "model": "/m/sd15",
    "family": "sd15",
    "prompts": ["x"],
    "seeds": [1],
    "steps": 1,
    "width": 64,
    "height": 64,
    "shard_size": 10,
    "output_prefix": "datasets",
}
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/15"
MB = 1024 * 1024


# -- the manifest ------------------------------------------------------------------------------------
def manifest_bytes(rows: int, groups: int = 1) -> bytes:
    """JSONL rows; with ``groups`` > 1 rows alternate between ``steps`` overrides (one job each)."""
    lines = []
    for i in range(rows):
        row: dict[str, Any] = {"id": f"row-{i:07d}", "prompt": f"a photo of subject {i}, studio light", "seed": i}
        if groups > 1:
            row["steps"] = 1 + i % groups
        lines.append(json.dumps(row))
    return ("\n".join(lines) + "\n").encode()


# -- brokers: depth, taking messages off like a worker, clearing -----------------------------------
def shard_id_of(raw: bytes | str) -> uuid.UUID:
    """The shard id in a Celery protocol-2 message as kombu stores it (Redis list item, file)."""
    message = json.loads(raw)
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    _args, kwargs, _embed = json.loads(body)
    return uuid.UUID(kwargs["shard_id"])


class RedisBroker:
    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.client = redis.Redis.from_url(url)
        self.keys = [QUEUE] + [f"{QUEUE}:{p}" for p in PRIORITY_STEPS if p]

    def check_empty(self) -> None:
        if self.client.dbsize():
            raise SystemExit(f"{self.url} is not empty; pick an unused db with --redis-url")

    def depth(self) -> int:
        pipe = self.client.pipeline()
        for key in self.keys:
            pipe.llen(key)
        return sum(pipe.execute())

    def nbytes(self) -> int:
        return sum(self.client.memory_usage(key) or 0 for key in self.keys)

    def take(self, n: int) -> list[bytes]:
        """Up to ``n`` messages, as kombu's BRPOP takes them (priority lists in order, oldest first)."""
        out: list[bytes] = []
        for key in self.keys:
            if len(out) >= n:
                break
            out.extend(self.client.rpop(key, n - len(out)) or [])
        return out

    def clear(self) -> None:
        self.client.delete(*self.keys)  # the messages; kombu's queue bindings stay

    def close(self) -> None:
        self.client.flushdb()
        self.client.close()


class FolderBroker:
    """The kombu filesystem transport: one ``<ms>_<uuid>.<queue>.msg`` file per message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _files(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        names = [n for n in os.listdir(self.folder) if n.partition(".")[2] == f"{QUEUE}.msg"]
        return sorted(names, key=lambda n: int(n.partition("_")[0]))

    def check_empty(self) -> None:
        pass

    def depth(self) -> int:
        return len(self._files())

    def nbytes(self) -> int:
        return sum((self.folder / n).stat().st_size for n in self._files())

    def take(self, n: int) -> list[bytes]:
        out = []
        for name in self._files()[:n]:
            path = self.folder / name
            out.append(path.read_bytes())
            path.unlink()
        return out

    def clear(self) -> None:
        for name in self._files():
            (self.folder / name).unlink()

    def close(self) -> None:
        self.clear()


# -- environments: a fresh database (+ settings) per pass -------------------------------------------
class Services:
    """Scratch Postgres databases and a Redis db; every database made is dropped by :meth:`close`."""

    def __init__(self, pg_admin: str, redis_url: str, tmp: Path) -> None:
        self.pg_admin, self.tmp, self.made = pg_admin, tmp, []
        self.broker = RedisBroker(redis_url)
        self.broker.check_empty()

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            conn.execute(sql)

    def fresh(self) -> tuple[str, Any]:
        from sqlalchemy.engine import make_url

        from farm.settings import FarmSettings
        from storage.migrate import upgrade

        name = f"farm_bench_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        url = make_url(self.pg_admin).set(drivername="postgresql+psycopg", database=name)
        url_s = url.render_as_string(hide_password=False)
        upgrade(url_s)
        settings = FarmSettings(_env_file=None, data_dir=self.tmp, db={"url": url_s}, broker={"url": self.broker.url})
        return url_s, settings

    def close(self) -> None:
        for name in self.made:
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.broker.close()


class Embedded:
    """A temporary SQLite file per pass and the filesystem broker."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.count = tmp, 0
        self.broker = FolderBroker(tmp / "data" / "broker" / "messages")

    def fresh(self) -> tuple[str, Any]:
        from farm.settings import FarmSettings
        from storage.migrate import upgrade

        self.count += 1
        url = f"sqlite:///{self.tmp / f'bench-{self.count}.db'}"
        upgrade(url)
        settings = FarmSettings(
            _env_file=None, data_dir=self.tmp / "data", db={"url": url}, broker={"url": "filesystem://"}
        )
        return url, settings

    def close(self) -> None:
        self.broker.close()


# -- SQL time, by statement ----------------------------------------------------------------------------
class SqlClock:
    """Seconds spent in the database (cursor execute), per statement, while :meth:`on` is active."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.active = False
        self.by_statement: dict[str, list[float]] = {}
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        took = time.perf_counter() - conn.info["bench_started"].pop()
        if self.active:
            entry = self.by_statement.setdefault(" ".join(statement.split())[:110], [0, 0.0])
            entry[0] += 1
            entry[1] += took

    @contextmanager
    def on(self) -> Iterator[None]:
        self.reset()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def reset(self) -> None:
        self.by_statement = {}

    def total(self) -> float:
        return sum(s for _, s in self.by_statement.values())

    def top(self, n: int = 5) -> list[dict[str, Any]]:
        rows = sorted(self.by_statement.items(), key=lambda kv: -kv[1][1])[:n]
        return [{"statement": k, "calls": c, "seconds": s} for k, (c, s) in rows]


# -- the passes ----------------------------------------------------------------------------------------
def _open(url: str, settings: Any) -> tuple[Any, Any, Any]:
    from farm.celery_app import create_app
    from storage.db import make_engine, make_session_factory

    engine = make_engine(url)
    return engine, make_session_factory(engine), create_app(settings)


def _submit(factory: Any, name: str, data: bytes) -> tuple[list[Any], dict[str, Any], float, float]:
    from farm.bulk import submit_bulk
    from farm.bulk_manifest import read_manifest
    from storage.db import session_scope

    started = time.perf_counter()
    rows = read_manifest(data, f"{name}.jsonl")
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    with session_scope(factory) as session:
        summary = submit_bulk(session, name, BASE, rows)
    return rows, summary, read_s, time.perf_counter() - started


def _work(factory: Any, messages: list[bytes]) -> int:
    """What ``len(messages)`` workers do with the message each took, without rendering."""
    from storage.db import session_scope
    from storage.leases import claim_shard, finish_shard
    from storage.status import ShardStatus

    done = 0
    with session_scope(factory) as session:
        for raw in messages:
            lease = claim_shard(session, shard_id_of(raw), "bench-worker", 3600)
            if lease is not None:  # a duplicate message: the lease turns it away
                finish_shard(session, lease, ShardStatus.SUCCEEDED)
                done += 1
    return done


@contextmanager
def publish_timer() -> Iterator[list[float]]:
    """Seconds spent in ``farm.dispatch.publish_shards`` (``feed`` imports it at call time)."""
    import farm.dispatch

    spent = [0.0]
    original = farm.dispatch.publish_shards

    def timed(app: Any, dispatches: Any, *args: Any, **kwargs: Any) -> list[uuid.UUID]:
        started = time.perf_counter()
        try:
            return original(app, dispatches, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    farm.dispatch.publish_shards = timed
    try:
        yield spent
    finally:
        farm.dispatch.publish_shards = original


def feed_loop(
    app: Any, factory: Any, broker: Any, window: int, batch: int, total: int, clock: SqlClock | None, traced: bool
) -> dict[str, Any]:
    from farm.feeder import feed, in_flight

    base = app.farm_settings  # no live worker is registered: the window is window_per_queue
    settings = base.model_copy(update={"scheduling": base.scheduling.model_copy(update={"window_per_queue": window})})
    done = fed = calls = max_depth = max_busy = 0
    feed_s = worker_s = 0.0
    call_s: list[float] = []
    feed_peak = 0
    started_all = time.perf_counter()
    while done < total:
        if traced:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        started = time.perf_counter()
        if clock is not None:
            clock.active = True
        sent = feed(app, factory, settings, [QUEUE])
        if clock is not None:
            clock.active = False
        took = time.perf_counter() - started
        if traced:
            feed_peak = max(feed_peak, tracemalloc.get_traced_memory()[1] - before)
        feed_s += took
        call_s.append(took)
        calls += 1
        fed += sent
        max_depth = max(max_depth, broker.depth())
        with factory() as session:
            max_busy = max(max_busy, sum(in_flight(session, QUEUE).here.values()))
        started = time.perf_counter()
        messages = broker.take(batch)
        if not messages and not sent:
            raise RuntimeError(f"feeding stalled: {done} of {total} shards done, nothing on the broker")
        done += _work(factory, messages)
        worker_s += time.perf_counter() - started
    call_s.sort()
    return {
        "shards_fed": fed,
        "feed_calls": calls,
        "feed_s": feed_s,
        "shards_fed_per_s": fed / max(feed_s, 1e-9),
        "feed_call_ms": {
            "median": 1000 * call_s[len(call_s) // 2],
            "p95": 1000 * call_s[min(len(call_s) - 1, int(0.95 * len(call_s)))],
            "max": 1000 * call_s[-1],
        },
        "simulated_workers_s": worker_s,
        "loop_s": time.perf_counter() - started_all,
        "max_broker_depth": max_depth,
        "max_in_flight": max_busy,
        "feed_call_peak_kb": feed_peak / 1024 if traced else None,
    }


def _reset_pending(engine: Any) -> None:
    """Every shard back to PENDING (the baseline starts from the state the feeder started from)."""
    from sqlalchemy import text, update

    from storage.models import Shard
    from storage.status import ShardStatus

    with engine.begin() as conn:
        conn.execute(
            update(Shard).values(
                status=ShardStatus.PENDING,
                attempts=0,
                lease_owner=None,
                lease_expires_at=None,
                heartbeat_at=None,
                enqueued_at=None,
                started_at=None,
                finished_at=None,
                progress=0.0,
            )
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE shard"))


def direct_publish(app: Any, factory: Any, broker: Any, clock: SqlClock) -> dict[str, Any]:
    """The non-windowed path (``farm.schedule_job`` for every job): all pending shards at once."""
    from sqlalchemy import select

    from farm.dispatch import publish_shards
    from farm.scheduler import schedule_job
    from storage.db import session_scope
    from storage.models import Job
    from storage.transitions import mark_shards_queued

    started = time.perf_counter()
    with clock.on():
        with session_scope(factory) as session:
            jobs = session.scalars(select(Job.id).where(Job.bulk_id.is_not(None)).order_by(Job.created_at)).all()
            dispatches = [d for job in jobs for d in schedule_job(session, job)]
        publish_started = time.perf_counter()
        sent = publish_shards(app, dispatches)
        publish_s = time.perf_counter() - publish_started
        with session_scope(factory) as session:
            mark_shards_queued(session, sent)
    took = time.perf_counter() - started
    depth, nbytes = broker.depth(), broker.nbytes()
    broker.clear()
    return {
        "shards": len(sent),
        "seconds": took,
        "publish_s": publish_s,
        "sql_s": clock.total(),
        "shards_per_s": len(sent) / max(took, 1e-9),
        "broker_depth": depth,
        "broker_bytes": nbytes,
    }


def timed_pass(env: Any, rows: int, data: bytes, window: int, batch: int, groups: int) -> dict[str, Any]:
    url, settings = env.fresh()
    engine, factory, app = _open(url, settings)
    clock = SqlClock(engine)
    try:
        with clock.on():
            parsed, summary, read_s, submit_s = _submit(factory, f"bench-{rows}", data)
        submit_sql = clock.total()
        submit_top = clock.top()
        del parsed
        total = summary["shards"]
        clock.reset()  # feed_loop switches it on around the feed calls only
        with publish_timer() as publish_s:
            feeding = feed_loop(app, factory, env.broker, window, batch, total, clock, traced=False)
        feeding["feed_sql_s"] = clock.total()
        feeding["feed_publish_s"] = publish_s[0]
        feeding["feed_other_s"] = feeding["feed_s"] - feeding["feed_sql_s"] - publish_s[0]
        feeding["feed_top_statements"] = clock.top()
        env.broker.clear()
        # the broker bytes of one full window, for the comparison with the direct publish
        feeding["window_broker_bytes"] = _window_bytes(app, factory, env.broker, window)
        _reset_pending(engine)
        direct = direct_publish(app, factory, env.broker, clock)
    finally:
        app.close()
        engine.dispose()
    return {
        "rows": rows,
        "jobs": summary["jobs"],
        "shards": total,
        "manifest_bytes": len(data),
        "read_manifest_s": read_s,
        "read_rows_per_s": rows / max(read_s, 1e-9),
        "submit_s": submit_s,
        "submit_rows_per_s": rows / max(submit_s, 1e-9),
        "submit_sql_s": submit_sql,
        "submit_top_statements": submit_top,
        "expand_total_s": read_s + submit_s,
        "feeding": feeding,
        "direct": direct,
    }


def _window_bytes(app: Any, factory: Any, broker: Any, window: int) -> int:
    """Broker bytes of one window's messages (shards already done: the messages are only measured)."""
    from sqlalchemy import select

    from farm.dispatch import publish_shards
    from farm.scheduler import ShardDispatch
    from storage.models import Job, Shard

    with factory() as session:
        rows = session.execute(
            select(Shard.id, Shard.job_id, Shard.queue, Job.priority).join(Job, Job.id == Shard.job_id).limit(window)
        ).all()
    publish_shards(app, [ShardDispatch(r.id, r.job_id, r.queue, r.priority) for r in rows])
    nbytes = broker.nbytes()
    broker.clear()
    return nbytes


def memory_pass(env: Any, rows: int, data: bytes, window: int, batch: int, groups: int) -> dict[str, Any]:
    url, settings = env.fresh()
    engine, factory, app = _open(url, settings)
    tracemalloc.start()
    try:
        from farm.bulk_manifest import read_manifest

        parsed = read_manifest(data, "m.jsonl")
        rows_bytes, _ = tracemalloc.get_traced_memory()
        del parsed
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        parsed, summary, _, _ = _submit(factory, f"bench-{rows}", data)
        submit_peak = tracemalloc.get_traced_memory()[1] - base
        del parsed
        feeding = feed_loop(app, factory, env.broker, window, batch, summary["shards"], None, traced=True)
    finally:
        tracemalloc.stop()
        env.broker.clear()
        app.close()
        engine.dispose()
    return {
        "manifest_rows_mb": rows_bytes / MB,
        "submit_peak_mb": submit_peak / MB,
        "feed_call_peak_kb": feeding["feed_call_peak_kb"],
    }


def bench(env: Any, rows: int, window: int, batch: int, groups: int, memory: bool) -> dict[str, Any]:
    data = manifest_bytes(rows, groups)
    result = timed_pass(env, rows, data, window, batch, groups)
    result["memory"] = memory_pass(env, rows, data, window, batch, groups) if memory else None
    f, d = result["feeding"], result["direct"]
    result["feeder_rate_over_direct"] = f["shards_fed_per_s"] / max(d["shards_per_s"], 1e-9)
    result["direct_depth_over_feeder_depth"] = d["broker_depth"] / max(f["max_broker_depth"], 1)
    return result


def print_result(r: dict[str, Any], window: int, batch: int) -> None:
    f, d, m = r["feeding"], r["direct"], r["memory"]
    print(f"{r['rows']} rows -> {r['jobs']} job(s), {r['shards']} shards (manifest {r['manifest_bytes'] / MB:.1f} MB)")
    print(
        f"  expand   read_manifest {r['read_manifest_s']:.2f} s ({r['read_rows_per_s']:,.0f} rows/s)  "
        f"submit_bulk + commit {r['submit_s']:.2f} s ({r['submit_rows_per_s']:,.0f} rows/s, "
        f"SQL {r['submit_sql_s']:.2f} s)  total {r['expand_total_s']:.2f} s"
    )
    if m is not None:
        print(
            f"  memory   rows {m['manifest_rows_mb']:.1f} MB  read + submit peak {m['submit_peak_mb']:.1f} MB  "
            f"one feed call {m['feed_call_peak_kb']:.0f} KB (tracemalloc, second pass)"
        )
    fc = f["feed_call_ms"]
    print(
        f"  feeder   window {window}, {batch} workers per round: {f['shards_fed']} shards in {f['feed_calls']} feed "
        f"calls, {f['feed_s']:.2f} s ({f['shards_fed_per_s']:,.0f} shards/s)  max broker depth "
        f"{f['max_broker_depth']}  max in flight {f['max_in_flight']}"
    )
    print(
        f"           feed time: SQL {f['feed_sql_s']:.2f} s, publish {f['feed_publish_s']:.2f} s, rest "
        f"{f['feed_other_s']:.2f} s; per call median {fc['median']:.1f} ms, p95 {fc['p95']:.1f} ms, max "
        f"{fc['max']:.1f} ms; loop with the simulated workers {f['loop_s']:.1f} s"
    )
    print(
        f"  direct   all at once: {d['shards']} shards in {d['seconds']:.2f} s ({d['shards_per_s']:,.0f} shards/s; "
        f"publish {d['publish_s']:.2f} s, SQL {d['sql_s']:.2f} s)  broker depth {d['broker_depth']} "
        f"({d['broker_bytes'] / MB:.1f} MB vs {f['window_broker_bytes'] / 1024:.0f} KB for one window)"
    )
    print(
        f"  feeder / direct rate {r['feeder_rate_over_direct']:.0%}   broker depth direct / feeder "
        f"{r['direct_depth_over_feeder_depth']:.0f}x"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--window", type=int, default=64, help="bulk shards in flight per queue")
    parser.add_argument("--batch", type=int, default=16, help="simulated workers ending a shard between feed calls")
    parser.add_argument("--groups", type=int, default=1, help="override groups (jobs) the rows fall into")
    parser.add_argument("--embedded", action="store_true", help="temporary SQLite + filesystem broker")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="Postgres URL allowed to CREATE DATABASE")
    parser.add_argument("--redis-url", default=REDIS_URL, help="an empty Redis db (flushed at the end)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    window, batch = max(1, args.window), max(1, args.batch)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        env = Embedded(Path(tmp)) if args.embedded else Services(args.pg_admin, args.redis_url, Path(tmp))
        try:
            bench(env, 50, window, batch, 1, memory=False)  # warm-up: imports, statement caches
            for rows in args.rows:
                result = bench(env, rows, window, batch, max(1, args.groups), memory=not args.no_memory)
                print_result(result, window, batch)
                results.append(result)
        finally:
            env.close()
    out = {
        "backend": "sqlite + filesystem broker" if args.embedded else "postgres + redis",
        "window": window,
        "batch": batch,
        "groups": max(1, args.groups),
        "shard_size": BASE["shard_size"],
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
