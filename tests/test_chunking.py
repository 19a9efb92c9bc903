"""Statements over many values stay below the drivers' parameter limits; scheduling inserts and
streams a large job's shards; summaries list a few shards. Real SQLite and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event, func, select

from farm.errors import UserError
from farm.feeder import feed
from farm.job_views import shard_limit
from farm.scheduler import (
    create_shards,
    job_summary,
    schedule_job,
    shards_worth_showing,
    submit_job,
)
from farm.sharding import plan_shards
from farm.specs import parse_spec
from storage.chunking import IN_CHUNK, MAX_PARAMS, chunked, insert_rows, rows_per_statement
from storage.db import session_scope
from storage.leases import claim_shard, finish_shard
from storage.models import Job, Shard
from storage.status import JobStatus, ShardStatus
from storage.transitions import mark_shards_queued
from tests.fixtures.database import default_owner


def spec(items: int, shard_size: int = 1) -> dict:
    return {
        "model": "/models/tiny",
        "family": "sd15",
        "prompts": ["a", "b"],
        "base_seed": 1,
        "count": items // 2,
        "steps": 2,
        "width": 64,
        "height": 64,
        "shard_size": shard_size,
        "output_prefix": "big",
    }


@contextmanager
def parameter_counts(session) -> Iterator[list[int]]:
    """The number of bind parameters of every call to the driver on ``session``'s engine (an
    ``executemany`` counts the values of all its rows)."""
    counts: list[int] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        rows = parameters if executemany else [parameters]
        counts.append(sum(len(row or ()) for row in rows))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield counts
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_chunked_is_lazy_and_exact() -> None:
    def numbers() -> Iterator[int]:
        yield from range(7)
        raise AssertionError("read past what was asked for")

    chunks = chunked(numbers(), 3)
    assert next(chunks) == [0, 1, 2] and next(chunks) == [3, 4, 5]
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []
    with pytest.raises(ValueError):
        list(chunked([1], 0))
    assert rows_per_statement(25) == MAX_PARAMS // 25 and rows_per_statement(10**6) == 1


def test_marking_70000_shards_queued_is_cut_into_statements(session) -> None:
    job = Job(
        kind="text_to_image", family="sd15", spec={}, spec_hash="0" * 64, output_prefix="r", **default_owner(session)
    )
    session.add(job)
    session.flush()
    real = [uuid.uuid4() for _ in range(3)]
    insert_rows(
        session,
        Shard,
        ({"id": i, "job_id": job.id, "index": n, "queue": "q", "params": {}} for n, i in enumerate(real)),
    )
    ids = [uuid.uuid4() for _ in range(70_000)] + real
    with parameter_counts(session) as counts:
        assert mark_shards_queued(session, ids) == 3
    assert len(counts) == -(-len(ids) // IN_CHUNK) and max(counts) <= IN_CHUNK + 10


def test_scheduling_inserts_the_planned_shards_in_bounded_statements(session) -> None:
    job, _ = submit_job(session, parse_spec(spec(3_000)))
    with parameter_counts(session) as counts:
        assert create_shards(session, job.id)
    assert MAX_PARAMS // 2 < max(counts) <= MAX_PARAMS, max(counts)  # few statements, none too big
    session.expire_all()
    rows = session.execute(
        select(Shard.index, Shard.queue, Shard.params, Shard.items_total, Shard.status)
        .where(Shard.job_id == job.id)
        .order_by(Shard.index)
    ).all()
    plans = plan_shards(parse_spec(spec(3_000)), job.id)  # deterministic: the same shards, params, keys
    assert [(r.index, r.queue, r.params, r.items_total) for r in rows] == [
        (p.index, p.queue, p.to_params(), len(p.items)) for p in plans
    ]
    assert {r.status for r in rows} == {ShardStatus.PENDING}
    job = session.get(Job, job.id)
    assert (job.status, job.shards_total, job.items_total) == (JobStatus.RUNNING, 3_000, 3_000)
    assert create_shards(session, job.id)  # running: nothing inserted again
    assert session.scalar(select(func.count()).where(Shard.job_id == job.id)) == 3_000


def _messages(folder) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


def test_a_feed_sends_the_window_and_a_redelivered_schedule_sends_nothing_more(session_factory, tmp_path) -> None:
    from farm.celery_app import create_app
    from farm.settings import FarmSettings

    settings = FarmSettings(_env_file=None, data_dir=tmp_path, scheduling={"window_per_queue": 7})
    app = create_app(settings)
    with session_scope(session_factory) as session:
        job, _ = submit_job(session, parse_spec(spec(50)))
        dispatches = schedule_job(session, job.id)
        job_id = job.id
    assert len(dispatches) == 50
    assert feed(app, session_factory, settings, ["farm.gpu.sd15"]) == 7
    assert _statuses(session_factory, job_id) == {"queued": 7, "pending": 43}
    assert feed(app, session_factory, settings, ["farm.gpu.sd15"]) == 0  # the window is full
    with session_scope(session_factory) as session:
        assert schedule_job(session, job_id) == dispatches[7:]  # still pending, in order
    assert _messages(settings.broker_folder / "messages") == 7
    app.close()


@pytest.mark.integration
def test_concurrent_feeders_of_one_queue_fill_its_window_once(empty_pg_url, tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from farm.celery_app import create_app
    from farm.settings import FarmSettings
    from storage.db import make_engine, make_session_factory
    from storage.migrate import upgrade

    upgrade(empty_pg_url)  # a database of its own: no other test's shards to feed
    engine = make_engine(empty_pg_url)
    factory = make_session_factory(engine)
    settings = FarmSettings(_env_file=None, data_dir=tmp_path, scheduling={"window_per_queue": 10})
    app = create_app(settings)
    with session_scope(factory) as session:
        job, _ = submit_job(session, parse_spec(spec(30)))
        create_shards(session, job.id)
        job_id = job.id
    with ThreadPoolExecutor(4) as pool:  # four feeders at once: the queue's lock makes them take turns
        sent = list(pool.map(lambda _: feed(app, factory, settings, ["farm.gpu.sd15"]), range(4)))
    assert sorted(sent) == [0, 0, 0, 10]
    assert _statuses(factory, job_id) == {"queued": sum(sent), "pending": 30 - sum(sent)}
    assert _messages(settings.broker_folder / "messages") == sum(sent)
    app.close()
    engine.dispose()


def _statuses(factory, job_id) -> dict[str, int]:
    with session_scope(factory) as session:
        rows = session.execute(
            select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
        ).all()
    return {status.value: n for status, n in rows}


def test_a_summary_lists_the_shards_worth_showing(session) -> None:
    job, _ = submit_job(session, parse_spec(spec(40)))
    dispatches = schedule_job(session, job.id)
    mark_shards_queued(session, [d.shard_id for d in dispatches])
    for d in dispatches[:3]:  # three failed, two running
        lease = claim_shard(session, d.shard_id, "w", 60)
        finish_shard(session, lease, ShardStatus.FAILED, error="boom")
    for d in dispatches[10:12]:
        claim_shard(session, d.shard_id, "w", 60)
    full = job_summary(session, job.id)
    assert len(full["shards"]) == full["shards_total"] == full["shards_listed"] == 40
    short = job_summary(session, job.id, shard_limit=6)
    assert short["shards_total"] == 40 and short["shards_listed"] == len(short["shards"]) == 6
    assert short["shards_by_status"] == {"failed": 3, "running": 2, "queued": 35}
    assert short["shards_failed"] == 3 and short["items_done"] == full["items_done"]
    listed = {s["index"]: s["status"] for s in short["shards"]}
    assert {0, 1, 2, 10, 11} <= set(listed) and list(listed) == sorted(listed)
    assert {k: v for k, v in short.items() if k not in ("shards", "shards_listed")} == {
        k: v for k, v in full.items() if k not in ("shards", "shards_listed")
    }
    assert job_summary(session, job.id, shard_limit=40)["shards"] == full["shards"]  # no more: all
    assert job_summary(session, job.id, shard_limit=0)["shards"] == []
    assert shards_worth_showing(session, job.id, 2) and len(shards_worth_showing(session, job.id, 2)) == 2


def test_shard_limit_values() -> None:
    assert shard_limit("all") is None and shard_limit("ALL") is None
    assert shard_limit("5") == 5 and shard_limit(0) == 0
    for bad in ("many", -1, "-3"):
        with pytest.raises(UserError, match="shards"):
            shard_limit(bad)
