"""Bulk renders without workers: manifest reading, grouping and expansion into jobs and shards,
resubmission adding only new rows, windowed feeding, the nightly beat entry with an injected
clock. Real SQLite and Postgres."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from farm import bulk as b
from farm.beat import DailyAt, beat_schedule, next_at
from farm.bulk_manifest import ManifestError, derived_seed, read_manifest
from farm.errors import UserError
from farm.feeder import feed_queue, in_flight
from farm.settings import FarmSettings
from storage.leases import claim_shard, finish_shard
from storage.models import Job, ProjectMember, Shard
from storage.status import ShardStatus
from storage.transitions import mark_shards_queued

BASE = {
    "model": "/models/sd15",
    "family": "sd15",
    "prompts": ["a default prompt"],
    "seeds": [1],
    "steps": 2,
    "width": 64,
    "height": 64,
    "shard_size": 4,
    "output_prefix": "datasets",
}


def jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


# -- manifests -------------------------------------------------------------------------------------
def test_jsonl_rows_defaults_and_overrides() -> None:
    rows = read_manifest(
        jsonl([{"id": "a", "prompt": "p", "seed": 3}, {"prompt": "q", "steps": 9}, {"overrides": {"family": "sdxl"}}]),
        "m.jsonl",
    )
    assert [r.row_id for r in rows] == ["a", "row-000002", "row-000003"]
    assert rows[0].seed == 3 and rows[1].seed == derived_seed("row-000002")  # stable, from the id
    assert rows[1].overrides == {"steps": 9} and rows[2].overrides == {"family": "sdxl"}
    assert rows[0].group != rows[1].group


def test_csv_cells_are_json_when_they_parse() -> None:
    data = b'id,prompt,seed,steps,family\nx1,a cat,7,12,sdxl\nx2,"a dog, running",8,,\n'
    rows = read_manifest(data, "m.csv")
    assert [(r.row_id, r.prompt, r.seed, r.overrides) for r in rows] == [
        ("x1", "a cat", 7, {"steps": 12, "family": "sdxl"}),
        ("x2", "a dog, running", 8, {}),
    ]


def test_every_bad_row_is_named() -> None:
    data = jsonl([{"id": "../x"}, {"id": "ok", "seed": -1}, {"id": "ok2", "prompt": " "}, {"id": "d"}, {"id": "d"}])
    with pytest.raises(ManifestError) as info:
        read_manifest(data + b"\n", "m.jsonl")
    text = str(info.value)
    assert "line 1" in text and "line 2 (id ok): seed" in text and "line 5: id d repeats line 4" in text
    assert isinstance(info.value, ValueError)
    with pytest.raises(ManifestError, match="line 1: not JSON"):
        read_manifest(b"{nope", "m.jsonl")


def test_a_row_nested_10000_levels_deep_is_named_by_line() -> None:
    deep = "[" * 10_000 + "]" * 10_000
    with pytest.raises(ManifestError, match=r"^manifest m\.jsonl: line 2: nested too deeply to read$"):
        read_manifest(b'{"id": "a"}\n{"id": "b", "overrides": {"x": ' + deep.encode() + b"}}\n", "m.jsonl")
    with pytest.raises(ManifestError, match=r"^manifest m\.csv: line 3: column 'steps': nested too deeply to read$"):
        read_manifest(b"id,steps\na,4\nb," + deep.encode() + b"\n", "m.csv")
    forty = "[" * 40 + "]" * 40  # readable, but deeper than any spec may be
    with pytest.raises(ManifestError, match=r"line 1: nested more than 32 levels deep"):
        read_manifest(b'{"id": "a", "overrides": {"x": ' + forty.encode() + b"}}", "m.jsonl")


def test_a_csv_cell_over_128_kib_is_named_by_line() -> None:
    data = b"id,prompt\nr1,a cat\nr2," + b"x" * (129 << 10) + b"\n"
    with pytest.raises(ManifestError) as info:
        read_manifest(data, "rows.csv")
    assert str(info.value) == (
        "manifest rows.csv: line 3: a cell is longer than 131072 characters (128 KiB), the most a CSV cell may hold"
    )


def test_a_manifest_that_is_not_utf8_is_named_by_line_and_column() -> None:
    with pytest.raises(ManifestError, match=r"^manifest m\.jsonl: line 2, column 12: not UTF-8 text"):
        read_manifest(b'{"id": "a"}\n{"id": "caf\xe9"}\n', "m.jsonl")
    with pytest.raises(ManifestError, match=r"^manifest m\.csv: line 3, column 6: not UTF-8 text"):
        read_manifest(b"id,prompt\na,cat\nb,caf\xe9 au lait\n", "m.csv")


def test_ids_fit_their_output_name_and_the_limit_is_stated_truly() -> None:
    (row,) = read_manifest(jsonl([{"id": "i" * 123}]), "m.jsonl")
    assert len(row.row_id) == 123
    with pytest.raises(ManifestError) as info:
        read_manifest(jsonl([{"id": "i" * 128}]), "m.jsonl")
    message = str(info.value)
    assert "line 1: id: 128 characters; an id may have at most 123" in message
    assert "longer than 128" not in message


def test_rows_are_counted_by_physical_line() -> None:
    rows = read_manifest('{"id": "a", "prompt": "one\u2028two"}\n\n{"id": "b"}\n'.encode(), "m.jsonl")
    assert [(r.row_id, r.line) for r in rows] == [("a", 1), ("b", 3)] and rows[0].prompt == "one\u2028two"
    rows = read_manifest(b'id,prompt\nr1,"a\ncat"\n\nr2,dog\n', "m.csv")
    assert [(r.row_id, r.line, r.prompt) for r in rows] == [("r1", 2, "a\ncat"), ("r2", 5, "dog")]


def test_bad_overrides_and_huge_numbers_are_row_errors() -> None:
    with pytest.raises(ManifestError, match=r"line 1 \(id a\): overrides must be an object of spec fields, not list"):
        read_manifest(jsonl([{"id": "a", "overrides": [1]}]), "m.jsonl")
    with pytest.raises(ManifestError, match=r"line 1: not JSON \(Exceeds the limit \(4300 digits\)"):
        read_manifest(b'{"id": "a", "seed": ' + b"9" * 5000 + b"}", "m.jsonl")


def test_manifests_have_a_size_limit(tmp_path, monkeypatch) -> None:
    from farm import bulk_manifest

    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl([{"id": f"r{i}"} for i in range(100)]))
    assert read_manifest(bulk_manifest.read_manifest_file(path), "rows.jsonl")
    monkeypatch.setattr(bulk_manifest, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ManifestError, match=rf"^manifest {path}: larger than 1000 bytes, the most a manifest may"):
        bulk_manifest.read_manifest_file(path)
    with pytest.raises(ManifestError, match=r"^manifest rows\.jsonl: larger than"):
        read_manifest(path.read_bytes(), "rows.jsonl")
    monkeypatch.setattr(bulk_manifest, "MAX_MANIFEST_ROWS", 10)
    with pytest.raises(ManifestError, match=r"more than 10 rows; split the manifest"):
        read_manifest(jsonl([{"id": f"r{i}"} for i in range(11)]), "rows.jsonl")
    with pytest.raises(ManifestError, match=r"cannot read it"):
        bulk_manifest.read_manifest_file(tmp_path / "missing.jsonl")


# -- submit, resubmit, status ---------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A database of this test's own: feeding counts every bulk shard in it."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    from storage.migrate import upgrade

    url = request.getfixturevalue("empty_pg_url")
    upgrade(url)
    return url


@pytest.fixture
def session(session_factory):
    with session_factory() as s:
        yield s


def _name() -> str:
    return f"bulk-{uuid.uuid4().hex[:8]}"


def test_rows_become_jobs_by_group_with_stable_keys(session) -> None:
    name = _name()
    rows = read_manifest(
        jsonl([{"id": f"r{i}", "prompt": f"p{i}"} for i in range(10)] + [{"id": "x", "family": "sdxl"}]), "m.jsonl"
    )
    result = b.submit_bulk(session, name, BASE, rows)
    session.commit()
    assert (result["new_rows"], result["jobs"], result["shards"]) == (11, 2, 3 + 1)
    jobs = session.scalars(select(Job).where(Job.bulk_id == uuid.UUID(result["bulk_id"]))).all()
    assert sorted(j.family for j in jobs) == ["sd15", "sdxl"] and all(j.status == "running" for j in jobs)
    items = [
        i
        for s in session.scalars(select(Shard.params).where(Shard.job_id.in_([j.id for j in jobs])))
        for i in s["items"]
    ]
    by_row = {i["row_id"]: i for i in items}
    assert by_row["r3"]["key"] == f"datasets/{name}/r3.png" and by_row["r3"]["prompt"] == "p3"
    assert by_row["x"]["prompt"] == "a default prompt"  # the base's, when the row has none
    assert (
        session.scalar(
            select(func.count())
            .select_from(Shard)
            .where(Shard.status == ShardStatus.PENDING)
            .where(Shard.job_id.in_([j.id for j in jobs]))
        )
        == 4
    )


def test_resubmitting_adds_only_new_rows(session) -> None:
    name = _name()
    first = [{"id": f"r{i}"} for i in range(6)]
    b.submit_bulk(session, name, BASE, read_manifest(jsonl(first), "m.jsonl"))
    again = b.submit_bulk(session, name, BASE, read_manifest(jsonl([*first, {"id": "r6"}, {"id": "r7"}]), "m.jsonl"))
    session.commit()
    assert (again["new_rows"], again["known_rows"], again["shards"]) == (2, 6, 1)
    assert b.bulk_status(session, name)["rows"] == 8
    with pytest.raises(UserError, match="different base spec"):
        b.submit_bulk(session, name, {**BASE, "steps": 3}, read_manifest(jsonl(first), "m.jsonl"))
    with pytest.raises(UserError, match="bulk renders take"):
        b.submit_bulk(session, _name(), {**BASE, "kind": "temporal_video"}, read_manifest(jsonl(first), "m.jsonl"))


def test_a_row_whose_overrides_break_the_spec_is_named(session) -> None:
    with pytest.raises(UserError, match=r"row bad \(line 2\).*steps"):
        b.submit_bulk(session, _name(), BASE, read_manifest(jsonl([{"id": "ok"}, {"id": "bad", "steps": 0}]), "m"))


def test_bulk_outputs_never_land_in_the_farms_own_folders(session) -> None:
    """Outputs are ``{output_prefix}/{name}/{id}.png``: no base, row override or empty prefix may
    make that ``inputs/...`` (content-addressed uploads) or ``models/...``."""
    digest = "ab" * 32
    rows = read_manifest(jsonl([{"id": digest}]), "m.jsonl")
    with pytest.raises(UserError, match=r"output_prefix: 'inputs' would put outputs in 'inputs/'") as info:
        b.submit_bulk(session, "sha256", {**BASE, "output_prefix": "inputs"}, rows)
    assert isinstance(info.value, ValueError) and not info.value.retryable
    override = read_manifest(jsonl([{"id": "ok"}, {"id": digest, "output_prefix": "Inputs/sha256"}]), "m.jsonl")
    with pytest.raises(UserError, match=rf"row {digest} \(line 2\).*output_prefix: 'Inputs/sha256' would put"):
        b.submit_bulk(session, _name(), BASE, override)
    with pytest.raises(UserError, match=r"name: 'models' would put outputs in 'models/'"):
        b.submit_bulk(session, "models", {**BASE, "output_prefix": ""}, rows)
    session.rollback()
    fine = b.submit_bulk(session, "models", BASE, rows)  # the name is not the top folder here
    (params,) = session.scalars(select(Shard.params).join(Job).where(Job.bulk_id == uuid.UUID(fine["bulk_id"])))
    assert params["items"][0]["key"] == f"datasets/models/{digest}.png"


# -- feeding ----------------------------------------------------------------------------------------
def _bulk_shards(session, name: str) -> list[Shard]:
    bulk = b.get_bulk(session, name)
    return session.scalars(select(Shard).join(Job).where(Job.bulk_id == bulk.id).order_by(Shard.index)).all()


def feed_bulk(session, window: int, now: datetime | None = None) -> list:
    """What the feeder sends to farm.gpu.sd15 now, with a window of ``window`` (no live workers)."""
    settings = FarmSettings(_env_file=None, scheduling={"window_per_queue": window})
    return [d for d, _ in feed_queue(session, settings, "farm.gpu.sd15", now).dispatches]


def test_feeding_keeps_each_queue_within_the_window(session) -> None:
    name = _name()
    b.submit_bulk(
        session, name, {**BASE, "shard_size": 1}, read_manifest(jsonl([{"id": f"r{i}"} for i in range(12)]), "m")
    )
    session.commit()
    window = 5
    sent = feed_bulk(session, window)
    mark_shards_queued(session, [d.shard_id for d in sent])
    session.commit()
    assert len(sent) == 5 and sum(in_flight(session, "farm.gpu.sd15").here.values()) == window
    assert feed_bulk(session, window) == []  # full
    lease = claim_shard(session, sent[0].shard_id, "w", 60)
    finish_shard(session, lease, ShardStatus.SUCCEEDED)
    session.commit()
    (refill,) = feed_bulk(session, window)  # one ended, one more goes
    assert refill.shard_id not in {d.shard_id for d in sent}


def test_the_user_cap_holds_from_a_users_first_shard(session) -> None:
    """``scheduling.max_running_per_user`` caps a user with nothing in flight yet too: one feed
    with room for 10 sends 3, not 10."""
    b.submit_bulk(
        session, _name(), {**BASE, "shard_size": 1}, read_manifest(jsonl([{"id": f"r{i}"} for i in range(12)]), "m")
    )
    session.commit()
    settings = FarmSettings(_env_file=None, scheduling={"window_per_queue": 10, "max_running_per_user": 3})
    assert len(feed_queue(session, settings, "farm.gpu.sd15").dispatches) == 3


def test_one_feed_or_several_send_the_same_shards(session) -> None:
    """A shard in flight weighs what it weighed when it was picked (its items at the estimated
    seconds per item), so feeding three shards at once or one at a time (each marked queued before
    the next feed) gives the same order: A's 10-item shard first (its project's job is older),
    then B's 1-item shards while B has used less."""
    from storage.identity import create_user

    owners = [create_user(session, f"u-{_name()}", "member", project=f"p-{_name()}") for _ in "ab"]
    session.flush()
    for owner, size in zip(owners, (10, 1), strict=True):
        project_id = session.scalar(select(ProjectMember.project_id).where(ProjectMember.user_id == owner.id))
        rows = read_manifest(jsonl([{"id": f"r{i}"} for i in range(3 * size)]), "m")
        b.submit_bulk(session, _name(), {**BASE, "shard_size": size}, rows, owner_id=owner.id, project_id=project_id)
        session.commit()
    at_once = [d.job_id for d in feed_bulk(session, 3)]
    session.rollback()
    one_by_one = []
    for window in (1, 2, 3):
        (sent,) = feed_bulk(session, window)
        mark_shards_queued(session, [sent.shard_id])
        session.commit()
        one_by_one.append(sent.job_id)
    assert one_by_one == at_once
    assert [session.get(Job, j).owner_id for j in at_once] == [owners[0].id, owners[1].id, owners[1].id]


def test_feeding_stops_at_feed_until(session) -> None:
    name = _name()
    now = datetime.now(UTC)
    b.submit_bulk(session, name, BASE, read_manifest(jsonl([{"id": "r"}]), "m"), feed_until=now + timedelta(hours=1))
    session.commit()
    mine = {s.id for s in _bulk_shards(session, name)}
    assert mine & {d.shard_id for d in feed_bulk(session, 10_000, now)}
    assert not mine & {d.shard_id for d in feed_bulk(session, 10_000, now + timedelta(hours=2))}


def test_retry_feeds_failed_rows_again(session) -> None:
    name = _name()
    b.submit_bulk(session, name, BASE, read_manifest(jsonl([{"id": "r"}]), "m"))
    session.commit()
    (shard,) = _bulk_shards(session, name)
    lease = claim_shard(session, shard.id, "w", 60)
    finish_shard(session, lease, ShardStatus.FAILED, error="boom")
    session.commit()
    assert b.bulk_status(session, name)["failed"] == 1
    assert b.retry_failed_rows(session, name) == 1
    session.commit()
    status = b.bulk_status(session, name)
    assert (status["failed"], status["remaining"]) == (0, 1)
    session.expire_all()
    assert session.get(Shard, shard.id).status == ShardStatus.PENDING


# -- the nightly entry ----------------------------------------------------------------------------
def test_daily_at_fires_at_the_local_time_with_an_injected_clock() -> None:
    clock = {"now": datetime(2026, 11, 25, 0, 58, tzinfo=UTC)}  # 01:58 in Berlin (UTC+1)
    schedule = DailyAt("02:00", "Europe/Berlin", nowfun=lambda: clock["now"])
    last_run = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    due, wait = schedule.is_due(last_run)
    assert not due and wait == pytest.approx(120)
    clock["now"] = datetime(2026, 11, 25, 1, 0, 5, tzinfo=UTC)  # 02:00:05 local
    due, wait = schedule.is_due(last_run)
    assert due and wait == pytest.approx(24 * 3600 - 5)
    assert next_at(clock["now"], "06:00", "Europe/Berlin") == datetime(2026, 11, 25, 5, 0, tzinfo=UTC)


def test_beat_fires_the_nightly_entry(monkeypatch) -> None:
    """A real celery beat Scheduler ticks over our entries with the clock moved past 02:00."""
    from celery.beat import Scheduler

    from farm.celery_app import create_app

    settings = FarmSettings(
        _env_file=None,
        bulk={"schedules": [{"name": "nightly", "base": "b.yaml", "manifest": "m.jsonl", "at": "02:00",
                             "timezone": "Europe/Berlin", "window_end": "06:00"}]},
    )  # fmt: skip
    clock = {"now": datetime(2026, 11, 25, 0, 50, tzinfo=UTC)}
    app = create_app(settings)
    app.conf.beat_schedule = beat_schedule(settings, nowfun=lambda: clock["now"])
    sent: list[tuple[str, list]] = []
    monkeypatch.setattr(Scheduler, "apply_async", lambda self, entry, *a, **k: sent.append((entry.task, entry.args)))
    scheduler = Scheduler(app, lazy=True)
    scheduler.setup_schedule()
    for entry in scheduler.schedule.values():
        entry.last_run_at = clock["now"] - timedelta(minutes=1)
    scheduler.tick()
    assert ("farm.start_bulk", ["nightly"]) not in sent
    clock["now"] = datetime(2026, 11, 25, 1, 0, 30, tzinfo=UTC)
    scheduler.tick()
    assert ("farm.start_bulk", ["nightly"]) in sent
    app.close()


def test_the_nightly_task_submits_and_feeds_until_the_window_end(tmp_path) -> None:
    """What ``farm.start_bulk`` does when the entry fires, with a worker's own resources and Celery
    app: the night's rows, feeding until 06:00."""
    from farm.beat import start_scheduled_bulk
    from farm.celery_app import create_app
    from farm.worker.resources import WorkerResources
    from storage.migrate import upgrade

    (tmp_path / "base.json").write_text(json.dumps(BASE))
    (tmp_path / "rows.jsonl").write_bytes(jsonl([{"id": f"r{i}"} for i in range(6)]))
    entry = {"name": "nightly", "base": str(tmp_path / "base.json"), "manifest": str(tmp_path / "rows.jsonl"),
             "at": "02:00", "timezone": "Europe/Berlin", "window_end": "06:00"}  # fmt: skip
    settings = FarmSettings(
        _env_file=None,
        data_dir=tmp_path / "data",
        bulk={"schedules": [entry]},
        scheduling={"window_per_queue": 1},
    )
    upgrade(settings.database_url)
    night = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)  # 02:00 in Berlin
    app, res = create_app(settings), WorkerResources.create(settings, name="control")
    try:
        result = start_scheduled_bulk(app, res, "nightly", now=night)
        assert (result["new_rows"], result["fed"]) == (6, 1)  # shard_size 4: 2 shards, a window of 1
        assert result["feed_until"] == "2026-11-25T05:00:00+00:00"
        again = start_scheduled_bulk(app, res, "nightly", now=night + timedelta(days=1))
        assert (again["new_rows"], again["known_rows"], again["fed"]) == (0, 6, 0)  # the window is still full
    finally:
        app.close()
        res.close()


def test_a_manifest_in_the_bucket(tmp_path) -> None:
    """``store:<key>``: the manifest is read from the object store; a local one is kept there."""
    from farm.client import FarmClient
    from storage.migrate import upgrade

    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data")
    upgrade(settings.database_url)
    (tmp_path / "base.json").write_text(json.dumps(BASE))
    with FarmClient(settings) as client:
        client.store.put_bytes("manifests/night.jsonl", jsonl([{"id": "a"}, {"id": "b"}]))
        result = client.submit_bulk("from-bucket", tmp_path / "base.json", "store:manifests/night.jsonl")
        assert (result["new_rows"], result["fed"]) == (2, 1)
        (tmp_path / "more.jsonl").write_bytes(jsonl([{"id": "a"}, {"id": "c"}]))
        more = client.submit_bulk("from-bucket", tmp_path / "base.json", tmp_path / "more.jsonl")
        assert (more["new_rows"], more["known_rows"]) == (1, 1)
        status = client.bulk_status("from-bucket")
        assert status["rows"] == 3 and status["manifests"][0] == "manifests/night.jsonl"
        kept = status["manifests"][1]
        assert (
            kept.startswith("inputs/bulk/from-bucket/")
            and client.store.get_bytes(kept) == (tmp_path / "more.jsonl").read_bytes()
        )
