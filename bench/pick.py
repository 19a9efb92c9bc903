"""What choosing the next shards costs: one feed of a queue (:func:`farm.feeder.feed_queue`) over
100,000 pending shards of 1,000 jobs, 50 projects and 200 users, on a database of its own.

The table holds what a busy farm's holds: every job running, its first ``--done`` shards sent
(succeeded, or the last two in flight: queued or running) and the rest PENDING on
``farm.gpu.sd15`` (a fifth of the jobs interactive, the rest bulk; a tenth of all jobs in bulk runs;
one in 50 with a higher priority), every user a member of one to three projects, a fair-share
ledger row per (project, user); the shards in flight are on this queue and on ``farm.gpu.sdxl``
and count against caps and usage. The bench times ``feed_queue`` with the window set so that it
picks **1** shard and so that it picks **32**, with interactive shards waiting and with bulk ones
only, each call in a transaction that is rolled back (the table stays the same), medians of
``--repeats``; the figure the issue sets a bar for is milliseconds per pick (at most 5).
Baseline, same run and database: what the FIFO feeder paid per pick, the bare ``SELECT id, index,
items_total FROM shard WHERE job_id = .. AND status = 'pending' AND queue = .. ORDER BY index
LIMIT n`` of one job. Figures and what they mean: ``bench/README.md``.

    python -m bench pick [--shards 100000] [--done 20] [--jobs 1000] [--projects 50] [--users 200]
                         [--repeats 30] [--db-url postgresql+psycopg://postgres@127.0.0.1/postgres]
                         [--sqlite] [--profile]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from bench.cli import write_json

QUEUE, OTHER_QUEUE = "farm.gpu.sd15", "farm.gpu.sdxl"
IN_FLIGHT_HERE = 24  # queued or running on QUEUE; the window is set above this
PICKS = (1, 32)
EMPTY_SHARD = {"params": {}, "errors": [], "failed_workers": [], "timings": {}}


def _fill(
    engine: Any, shards: int, jobs: int, projects: int, users: int, done: int = 20, seed: int = 25
) -> dict[str, int]:
    """The table described in the module docstring, in bulk inserts. Returns what was made."""
    from sqlalchemy.orm import Session

    from storage.chunking import insert_rows
    from storage.models import BulkJob, Job, Project, ProjectMember, Shard, ShareUsage, User, utcnow
    from storage.status import JobStatus, Role, ServiceClass, ShardStatus

    rng = random.Random(seed)
    now = utcnow()
    old = now - timedelta(hours=2)
    stamps = {"created_at": old, "updated_at": old}
    project_ids = [uuid.uuid4() for _ in range(projects)]
    user_ids = [uuid.uuid4() for _ in range(users)]
    members = {(rng.choice(project_ids), u) for u in user_ids}  # everyone in at least one
    members |= {(rng.choice(project_ids), rng.choice(user_ids)) for _ in range(users)}
    member_list = sorted(members)
    runs = [(uuid.uuid4(), *member_list[i]) for i in range(0, len(member_list), max(1, len(member_list) // 10))]
    job_rows, shard_rows = [], []
    per_job = max(1, shards // jobs)
    in_flight = 0
    for j in range(jobs):
        run_id, project_id, owner_id = runs[j % len(runs)] if j % 10 == 9 else (None, *rng.choice(member_list))
        job_id = uuid.uuid4()
        interactive = run_id is None and j % 5 == 0
        job_rows.append(
            {
                "id": job_id,
                "kind": "text_to_image",
                "family": "sd15",
                "status": JobStatus.RUNNING,
                "priority": 5 if j % 50 == 0 else 0,
                "service_class": ServiceClass.INTERACTIVE if interactive else ServiceClass.BULK,
                "spec": {},
                "spec_hash": "0" * 64,
                "output_prefix": "bench",
                "owner_id": owner_id,
                "project_id": project_id,
                "bulk_id": run_id,
                "shards_total": done + per_job,
                "created_at": old + timedelta(seconds=j),
                "updated_at": old,
            }
        )
        flying = j % 20 in (0, 3)  # a tenth of the jobs, interactive and bulk, have two shards in flight
        for i in range(done + per_job):
            status, queue = ShardStatus.PENDING, QUEUE
            if i < done:  # the first `done` shards were sent: the last two in flight, or all succeeded
                status = ShardStatus.SUCCEEDED
                if flying and i >= done - 2:
                    status = ShardStatus.RUNNING if i == done - 2 else ShardStatus.QUEUED
                    queue = QUEUE if in_flight < IN_FLIGHT_HERE else OTHER_QUEUE
                    in_flight += 1
            lease = now + timedelta(hours=1) if status == ShardStatus.RUNNING else None
            shard_rows.append(
                {**EMPTY_SHARD, "id": uuid.uuid4(), "job_id": job_id, "index": i, "queue": queue, "status": status}
                | {"items_total": rng.choice((1, 4, 10)), "lease_expires_at": lease, **stamps}
            )
    with Session(engine) as session:
        insert_rows(
            session,
            User,
            ({"id": u, "name": f"user{n}", "role": Role.MEMBER, **stamps} for n, u in enumerate(user_ids)),
        )
        insert_rows(
            session,
            Project,
            (
                {"id": p, "name": f"project{n}", "share_weight": 1.0 + n % 3, **stamps}
                for n, p in enumerate(project_ids)
            ),
        )
        insert_rows(session, ProjectMember, ({"project_id": p, "user_id": u, **stamps} for p, u in member_list))
        insert_rows(
            session,
            ShareUsage,
            (
                {
                    "project_id": p,
                    "user_id": u,
                    "gpu_seconds": rng.uniform(0, 5000),
                    "items": rng.uniform(0, 2000),
                    "as_of": old,
                }
                for p, u in member_list
            ),
        )
        insert_rows(
            session,
            BulkJob,
            (
                {
                    "id": r,
                    "name": f"run{n}",
                    "base_spec": {},
                    "owner_id": u,
                    "project_id": p,
                    "feed_until": None,
                    **stamps,
                }
                for n, (r, p, u) in enumerate(runs)
            ),
        )
        insert_rows(session, Job, job_rows)
        insert_rows(session, Shard, shard_rows)
        session.commit()
    pending = sum(1 for r in shard_rows if r["status"] == ShardStatus.PENDING)
    return {
        "pending": pending,
        "in_flight": in_flight,
        "jobs": jobs,
        "projects": projects,
        "users": users,
        "members": len(member_list),
    }


def _median_ms(fn: Any, repeats: int) -> tuple[float, int]:
    """The median milliseconds of ``repeats`` calls of ``fn`` (after one warm-up), which returns
    (seconds it timed, how many shards it got); and that count, the same every time."""
    _, got = fn()
    times = []
    for _ in range(repeats):
        seconds, again = fn()
        assert again == got, f"{again} shards, then {got}"
        times.append(seconds)
    return statistics.median(times) * 1000, got


def measure(url: str, repeats: int, *, profile: bool = False) -> dict[str, Any]:
    """Time ``feed_queue`` picking 1 and 32 shards, with interactive shards waiting and with only
    bulk ones (the interactive jobs set aside in the rolled-back transaction, before the clock
    starts), and the baseline, on a filled database."""
    from sqlalchemy import func, select, update

    from farm.feeder import feed_queue
    from farm.settings import FarmSettings
    from storage.db import make_engine, make_session_factory
    from storage.models import Job, Shard, utcnow
    from storage.status import JobStatus, ServiceClass, ShardStatus

    engine = make_engine(url)
    factory = make_session_factory(engine)
    now = utcnow()
    with factory() as session:
        job_id = session.scalar(select(Job.id).where(Job.service_class == ServiceClass.BULK).limit(1))
        here = dict(
            session.execute(
                select(Job.service_class, func.count())
                .join(Shard, Shard.job_id == Job.id)
                .where(Shard.queue == QUEUE, Shard.status.in_([ShardStatus.QUEUED, ShardStatus.RUNNING]))
                .group_by(Job.service_class)
            ).all()
        )
    interactive_here, bulk_here = here.get(ServiceClass.INTERACTIVE, 0), here.get(ServiceClass.BULK, 0)
    out: dict[str, Any] = {"in_flight_here": {"interactive": interactive_here, "bulk": bulk_here}}
    with tempfile.TemporaryDirectory() as data:

        def feed_once(window: int, bulk_only: bool) -> tuple[float, int]:
            settings = FarmSettings(
                _env_file=None, data_dir=Path(data), db={"url": url}, scheduling={"window_per_queue": window}
            )
            with factory() as session:
                if bulk_only:
                    session.execute(
                        update(Job)
                        .where(Job.service_class == ServiceClass.INTERACTIVE)
                        .values(status=JobStatus.PENDING)
                    )
                started = time.perf_counter()
                fed = feed_queue(session, settings, QUEUE, now)
                seconds = time.perf_counter() - started
                session.rollback()
            return seconds, len(fed.dispatches)

        def baseline_once(picks: int) -> tuple[float, int]:
            with factory() as session:
                started = time.perf_counter()
                rows = session.execute(
                    select(Shard.id, Shard.index, Shard.items_total)
                    .where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING, Shard.queue == QUEUE)
                    .order_by(Shard.index)
                    .limit(picks)
                ).all()
                seconds = time.perf_counter() - started
                session.rollback()
            return seconds, len(rows)

        for picks in PICKS:
            base_ms, based = _median_ms(partial(baseline_once, picks), repeats)
            out[f"baseline_{picks}_ms"] = base_ms
            for mix, window, bulk_only in (
                ("interactive", interactive_here + picks, False),  # the interactive window has room for `picks`
                ("bulk", interactive_here + bulk_here + picks, True),  # the bulk window has room for `picks`
            ):
                feed_ms, fed = _median_ms(partial(feed_once, window, bulk_only), repeats)
                assert fed == based == picks, f"picked {fed}, baseline read {based}, wanted {picks}"
                figures = {"call_ms": feed_ms, "ms_per_pick": feed_ms / picks, "vs_baseline": feed_ms / base_ms}
                if profile:
                    figures["profile"] = _profile(partial(feed_once, window, bulk_only))
                out[f"{mix}_{picks}"] = figures
    engine.dispose()
    return out


def _profile(fn: Any) -> str:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(lambda: [fn() for _ in range(10)])
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    return text.getvalue()


def _postgres(db_url: str, fill: dict[str, int], repeats: int, profile: bool) -> dict[str, Any]:
    from sqlalchemy import text

    from bench.services import scratch_postgres
    from storage.db import make_engine

    with scratch_postgres(db_url.replace("postgresql+psycopg://", "postgresql://")) as url:
        engine = make_engine(url)
        started = time.perf_counter()
        made = _fill(engine, **fill)
        fill_s = time.perf_counter() - started
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        engine.dispose()
        return {"backend": "postgres", "made": made, "fill_s": fill_s, **measure(url, repeats, profile=profile)}


def _sqlite(fill: dict[str, int], repeats: int, profile: bool) -> dict[str, Any]:
    from sqlalchemy import text

    from storage.db import make_engine
    from storage.migrate import upgrade

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/farm.db"
        upgrade(url)
        engine = make_engine(url)
        started = time.perf_counter()
        made = _fill(engine, **fill)
        fill_s = time.perf_counter() - started
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
        engine.dispose()
        return {"backend": "sqlite", "made": made, "fill_s": fill_s, **measure(url, repeats, profile=profile)}


def run(fill: dict[str, int], db_url: str, repeats: int, *, sqlite: bool, profile: bool) -> dict[str, Any]:
    results = [_postgres(db_url, fill, repeats, profile)]
    if sqlite:
        results.append(_sqlite(fill, repeats, profile))
    return {"results": results}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--done", type=int, default=20, help="shards already sent per job (at least 2)")
    parser.add_argument("--jobs", type=int, default=1_000)
    parser.add_argument("--projects", type=int, default=50)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--db-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--sqlite", action="store_true", help="the same on a SQLite file too")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top of 10 calls each")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    fill = {
        "shards": args.shards,
        "done": max(2, args.done),
        "jobs": args.jobs,
        "projects": args.projects,
        "users": args.users,
    }
    result = run(fill, args.db_url, args.repeats, sqlite=args.sqlite, profile=args.profile)
    for row in result["results"]:
        made = row["made"]
        print(
            f"{row['backend']}: {made['pending']:,} pending shards, {made['jobs']:,} jobs, "
            f"{made['projects']} projects, "
            f"{made['users']} users ({made['members']} memberships), {made['in_flight']} in flight; "
            f"filled in {row['fill_s']:.1f}s"
        )
        for picks in PICKS:
            print(f"  baseline SELECT .. LIMIT {picks:>2} of one job:      {row[f'baseline_{picks}_ms']:7.2f} ms")
            for mix in ("interactive", "bulk"):
                figures = row[f"{mix}_{picks}"]
                print(
                    f"  feed_queue picking {picks:>2} {mix + ':':<12} {figures['call_ms']:7.2f} ms a call, "
                    f"{figures['ms_per_pick']:6.2f} ms per pick (bar: 5), {figures['vs_baseline']:.1f}x baseline"
                )
                if "profile" in figures:
                    print(figures["profile"])
    write_json(args.json, result)
    return result
