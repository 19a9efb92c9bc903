"""What the tasks call, without a Celery worker: the delivery of a shard message and the policy
for what its outcome sends next (:mod:`farm.shard_delivery`), the route a shard is sent again on
(:func:`farm.dispatch.shard_route`), scheduling a window at a time (:func:`farm.feeder.schedule`) and
finalize-then-feed (:func:`farm.finalizer.finalize_and_feed`). Real SQLite and Postgres
databases, real worker resources, and a real Celery app publishing to a real broker (the
filesystem broker of the embedded mode, and Redis) whose queues the tests read back."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import NoResultFound

from farm.celery_app import CONTROL_QUEUE, GPU_QUEUES, create_app
from farm.dispatch import ShardLabel, class_priority, shard_route
from farm.feeder import schedule
from farm.finalizer import finalize_and_feed
from farm.scheduler import create_shards, submit_job
from farm.settings import FarmSettings
from farm.shard_delivery import deliver_shard, follow_up
from farm.specs import parse_spec
from farm.worker.resources import WorkerResources
from farm.worker.runtime import REJECT_DELAY_S, ShardOutcome
from storage.blocklist import record_failure_streak
from storage.db import session_scope
from storage.leases import claim_shard, finish_shard
from storage.models import Job, Shard
from storage.registry import register_worker
from storage.status import ShardStatus
from tests.fixtures.database import default_owner
from tests.fixtures.farm import text_job

QUEUE = "farm.gpu.sd15"


@dataclass(frozen=True)
class Sent:
    """One message read back from the broker."""

    queue: str
    task: str
    kwargs: dict[str, Any]
    priority: int | None
    delay: float | None  # seconds from publishing to its ETA; None: no countdown
    argsrepr: str


class Rig:
    """A worker's resources (named ``w1``) and a Celery app over one database and one broker."""

    def __init__(self, tmp_path: Path, db_url: str, broker_url: str | None) -> None:
        broker = {"url": broker_url} if broker_url else {}
        self.settings = FarmSettings(
            _env_file=None,
            data_dir=tmp_path / "data",
            db={"url": db_url},
            broker=broker,
            worker={"lease_seconds": 60, "blocklist_after": 1},
            scheduling={"window_per_queue": 1},
        )
        self.app = create_app(self.settings)
        self.urgent = class_priority(self.app, "interactive")  # an interactive shard's message priority
        self.res = WorkerResources.create(self.settings, name="w1")
        self.messages()  # a shared broker (Redis) may hold an earlier test's messages

    def job(self, shards: int = 2, *, priority: int = 0, scheduled: bool = True) -> tuple[uuid.UUID, list[uuid.UUID]]:
        """A text job of ``shards`` shards (PENDING; none when not ``scheduled``)."""
        spec = parse_spec(text_job(Path("/models/tiny"), prompts=[f"p{i}" for i in range(shards)], count=1))
        spec = spec.model_copy(update={"shard_size": 1, "priority": priority})
        with session_scope(self.res.session_factory) as session:
            job, _ = submit_job(session, spec)
            if scheduled:
                create_shards(session, job.id)
            job_id = job.id
        return job_id, self.shard_ids(job_id)

    def shard_ids(self, job_id: uuid.UUID) -> list[uuid.UUID]:
        from sqlalchemy import select

        with session_scope(self.res.session_factory) as session:
            return list(session.scalars(select(Shard.id).where(Shard.job_id == job_id).order_by(Shard.index)))

    def messages(self) -> list[Sent]:
        """Every message on the farm's queues, taken off the broker."""
        found = []
        with self.app.connection_for_read() as conn:
            channel = conn.default_channel
            for queue in (CONTROL_QUEUE, *GPU_QUEUES):
                while (message := channel.basic_get(queue, no_ack=True)) is not None:
                    headers = message.headers
                    delay = None
                    if headers.get("eta"):
                        sent_at = message.decode()[1].get("sent_at")
                        delay = datetime.fromisoformat(headers["eta"]).timestamp() - sent_at if sent_at else 0.0
                    found.append(
                        Sent(
                            queue,
                            headers["task"],
                            message.decode()[1],
                            message.properties.get("priority"),
                            delay,
                            headers["argsrepr"],
                        )
                    )
        return found

    def close(self) -> None:
        self.app.close()
        self.res.close()


@pytest.fixture(
    params=[
        "sqlite-filesystem",
        pytest.param("postgres-filesystem", marks=pytest.mark.integration),
        pytest.param("postgres-redis", marks=pytest.mark.integration),
    ]
)
def rig(tmp_path: Path, request: pytest.FixtureRequest):
    """On SQLite, or on a Postgres database of its own (the blocklist looks at live workers), with
    the filesystem broker in ``tmp_path`` or the session's Redis database."""
    database, broker = request.param.split("-")
    if database == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        from storage.migrate import upgrade

        url = request.getfixturevalue("empty_pg_url")
        upgrade(url)
    made = Rig(tmp_path, url, request.getfixturevalue("redis_url") if broker == "redis" else None)
    yield made
    made.close()


def render(job_id: uuid.UUID, shard_id: uuid.UUID, index: int, priority: int = 0) -> tuple:
    """What a shard's message says: queue, task, ids, priority, label."""
    argsrepr = f"job={str(job_id)[:8]} shard={index} sd15 text_to_image"
    return (QUEUE, "farm.render_shard", str(shard_id), str(job_id), priority, argsrepr)


def shape(sent: Sent) -> tuple:
    if sent.task == "farm.render_shard":
        return (sent.queue, sent.task, sent.kwargs["shard_id"], sent.kwargs["job_id"], sent.priority, sent.argsrepr)
    return (sent.queue, sent.task, sent.kwargs["job_id"], sent.argsrepr)


def finalize(job_id: uuid.UUID) -> tuple:
    return (CONTROL_QUEUE, "farm.finalize_job", str(job_id), f"job={str(job_id)[:8]}")


# -- the route a shard is sent again on -----------------------------------------------------------


def test_the_route_is_the_shards_queue_its_class_priority_and_its_label(session, tmp_path: Path) -> None:
    job = Job(
        kind="text_to_image",
        family="sdxl",
        spec={},
        spec_hash="0" * 64,
        output_prefix="r",
        priority=7,
        **default_owner(session),
    )
    session.add(job)
    shards = [Shard(job=job, index=i, queue="farm.gpu.sdxl", params={}, items_total=1) for i in range(3)]
    session.add_all(shards)
    session.flush()
    amqp = create_app(FarmSettings(_env_file=None, data_dir=tmp_path, broker={"url": "amqp://guest@127.0.0.1//"}))
    redis = create_app(FarmSettings(_env_file=None, data_dir=tmp_path, broker={"url": "redis://127.0.0.1:6379/0"}))
    assert shard_route(amqp, session, shards[2].id) == {
        "queue": "farm.gpu.sdxl",
        "priority": 9,  # interactive first: AMQP delivers the highest number first
        "label": ShardLabel(2, "text_to_image", "sdxl"),
    }
    assert shard_route(redis, session, shards[2].id)["priority"] == 0  # kombu's Redis: the lowest first
    job.service_class = "bulk"
    session.flush()
    assert shard_route(amqp, session, shards[2].id)["priority"] == 0
    assert shard_route(redis, session, shards[2].id)["priority"] == 9
    with pytest.raises(NoResultFound):
        shard_route(amqp, session, uuid.uuid4())


# -- the outcome policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "requeued", "delay", "finalized"),
    [
        # blocked from the job: pause, then hand the shard back at once (no ETA: another worker takes it)
        (ShardOutcome("rejected", retry_in=0.5), True, None, False),
        (ShardOutcome("retry", retry_in=4.0, error="RuntimeError: flaky"), True, 4.0, False),
        (ShardOutcome("busy", retry_in=31.0), True, 31.0, False),
        (ShardOutcome("handed_back", retry_in=0.0), True, None, False),
        # the worker is stopping: handed back to the feeder (PENDING), or passed on unclaimed
        (ShardOutcome("drained"), False, None, False),
        (ShardOutcome("drained", retry_in=0.0), True, None, False),
        (ShardOutcome("succeeded"), False, None, True),
        (ShardOutcome("failed", error="ValueError: bad"), False, None, True),
        (ShardOutcome("cancelled", error="job cancelled"), False, None, True),
        (ShardOutcome("skipped"), False, None, False),
        (ShardOutcome("fenced", error="lease lost"), False, None, False),
    ],
    ids=lambda v: v.status if isinstance(v, ShardOutcome) else None,
)
def test_each_outcome_sends_what_it_calls_for(
    rig: Rig, outcome: ShardOutcome, requeued: bool, delay: float | None, finalized: bool
) -> None:
    job_id, shards = rig.job(2, priority=3)
    slept: list[float] = []
    follow_up(rig.app, rig.res, shards[1], job_id, outcome, sleep=slept.append)
    sent = rig.messages()
    expected = [render(job_id, shards[1], 1, priority=rig.urgent)] if requeued else []
    expected += [finalize(job_id)] if finalized else []
    assert sorted(map(shape, sent)) == sorted(expected)
    assert slept == ([0.5] if outcome.status == "rejected" else [])
    for message in sent:
        if message.task == "farm.render_shard":
            assert message.delay == (pytest.approx(delay, abs=1.0) if delay is not None else None)


# -- whole deliveries, through the worker runtime -------------------------------------------------


def test_a_shard_that_is_not_there_is_skipped_and_nothing_is_sent(rig: Rig) -> None:
    job_id, _ = rig.job(1)
    ghost = uuid.uuid4()
    result = deliver_shard(rig.app, rig.res, ghost, job_id, sent_at=None)
    assert result == {"outcome": "skipped", "error": None, "job_id": str(job_id), "shard_id": str(ghost)}
    assert rig.messages() == []


def test_a_shard_held_by_a_live_lease_is_sent_again_once_the_lease_could_have_expired(rig: Rig) -> None:
    job_id, shards = rig.job(2, priority=2)
    with session_scope(rig.res.session_factory) as session:
        assert claim_shard(session, shards[0], "w-other", 60) is not None
    result = deliver_shard(rig.app, rig.res, shards[0], job_id)
    assert result == {"outcome": "busy", "error": None, "job_id": str(job_id), "shard_id": str(shards[0])}
    [sent] = rig.messages()
    assert shape(sent) == render(job_id, shards[0], 0, priority=rig.urgent)
    assert sent.delay == pytest.approx(61.0, abs=3.0)  # the lease's 60 s, and one more


def test_a_delivery_reaching_a_draining_worker_is_sent_again_unclaimed(rig: Rig) -> None:
    from sqlalchemy import select

    job_id, shards = rig.job(1)
    rig.res.draining.set()  # SIGTERM came (farm.worker.drain)
    result = deliver_shard(rig.app, rig.res, shards[0], job_id)
    assert result["outcome"] == "drained"
    [sent] = rig.messages()
    assert shape(sent) == render(job_id, shards[0], 0, priority=rig.urgent)
    with session_scope(rig.res.session_factory) as session:
        query = select(Shard.status, Shard.attempts, Shard.lease_owner).where(Shard.id == shards[0])
        row = session.execute(query).one()
    assert tuple(row) == (ShardStatus.PENDING, 0, None)  # never claimed


def test_a_blocked_worker_hands_the_shard_back_for_another_one(rig: Rig) -> None:
    job_id, shards = rig.job(1)
    with session_scope(rig.res.session_factory) as session:
        record_failure_streak(session, job_id, "w1", "RuntimeError: bad GPU", block_after=1)
        register_worker(session, name="w2", hostname="h", queues=[QUEUE], device="cpu")
    started = time.monotonic()
    result = deliver_shard(rig.app, rig.res, shards[0], job_id)
    assert result["outcome"] == "rejected"
    assert time.monotonic() - started >= REJECT_DELAY_S  # the pause: a lone blocked worker does not spin
    [sent] = rig.messages()
    assert shape(sent) == render(job_id, shards[0], 0, priority=rig.urgent)
    assert sent.delay is None  # sent at once, with no ETA: another worker receives it


def test_a_shard_no_live_worker_may_take_fails_and_its_job_is_finalized(rig: Rig) -> None:
    job_id, shards = rig.job(1)
    with session_scope(rig.res.session_factory) as session:
        record_failure_streak(session, job_id, "w1", "RuntimeError: bad GPU", block_after=1)
    result = deliver_shard(rig.app, rig.res, shards[0], job_id)
    assert result["outcome"] == "failed" and "blocked from this job" in result["error"]
    assert [shape(m) for m in rig.messages()] == [finalize(job_id)]


# -- scheduling a window at a time, finalize then feed ---------------------------------------------


def test_a_job_is_sent_a_window_at_a_time_and_each_end_sends_the_next(rig: Rig) -> None:
    job_id, _ = rig.job(3, scheduled=False)
    # no live worker on the queue: the window is scheduling.window_per_queue (1)
    assert schedule(rig.app, rig.res, job_id) == {"job_id": str(job_id), "shards_sent": 1}
    shards = rig.shard_ids(job_id)
    assert [shape(m) for m in rig.messages()] == [render(job_id, shards[0], 0, priority=rig.urgent)]
    assert schedule(rig.app, rig.res, job_id) == {"job_id": str(job_id), "shards_sent": 0}  # a redelivery: full
    result = deliver_shard(rig.app, rig.res, shards[0], job_id)  # renders nothing: /models/tiny is not there
    assert result["outcome"] == "failed"
    sent = sorted(map(shape, rig.messages()))  # the end made room: the next shard, then the finalize
    assert sent == sorted([render(job_id, shards[1], 1, priority=rig.urgent), finalize(job_id)])


def test_a_bulk_shards_end_finalizes_its_job_and_feeds_the_next(rig: Rig, tmp_path: Path) -> None:
    from sqlalchemy import select

    from farm.bulk import submit_and_feed

    base = {**text_job(Path("/models/tiny")), "prompts": ["p"], "shard_size": 1}
    for name in ("base_seed", "count"):
        base.pop(name)
    base["seeds"] = [1]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": f"r{i}"}) for i in range(2)))
    submitted = submit_and_feed(rig.app, rig.res.session_factory, rig.res.store, rig.settings, "night", base, manifest)
    assert (submitted["jobs"], submitted["shards"], submitted["fed"]) == (1, 2, 1)  # a window of 1
    [first] = rig.messages()
    shard_id, job_id = uuid.UUID(first.kwargs["shard_id"]), uuid.UUID(first.kwargs["job_id"])
    with session_scope(rig.res.session_factory) as session:
        lease = claim_shard(session, shard_id, "w1", 60)
        finish_shard(session, lease, ShardStatus.SUCCEEDED, items_done=1)
    result = finalize_and_feed(rig.app, rig.res, job_id)
    assert result == {
        "job_id": str(job_id),
        "status": "running",
        "all_terminal": False,
        "outputs_written": False,
        "fed": 1,
    }
    [second] = rig.messages()
    assert second.task == "farm.render_shard" and second.kwargs["shard_id"] != str(shard_id)
    with session_scope(rig.res.session_factory) as session:
        assert session.scalar(select(Shard.status).where(Shard.id == shard_id)) == ShardStatus.SUCCEEDED


def test_a_task_whose_service_stayed_away_goes_back_to_its_queue() -> None:
    """The tasks' glue: past ``worker.service_wait_s`` the message is requeued, not failed."""
    from celery.exceptions import Reject

    from farm.outages import ServiceUnavailable
    from tasks.resources import requeue_on_outage

    with pytest.raises(Reject) as rejected, requeue_on_outage():
        raise ServiceUnavailable("database: still down after 30s")
    assert rejected.value.requeue is True and "still down" in str(rejected.value.reason)
    with requeue_on_outage():
        pass  # nothing to do when the steps went through
