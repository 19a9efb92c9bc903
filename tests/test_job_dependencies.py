"""Jobs that start after other jobs (``after:``), on real databases and with real workers.

- The spec: ``name``, ``after``, ``after_policy``, ``after_mode`` and their refusals.
- Submit: ``after`` resolved to job ids within the submitter's scope (names: their latest job of
  that name); an unknown name or another project's job id is the same SpecError naming ``after[i]``.
- The release conditions (:mod:`storage.dependencies`) in the database, and the feeder picking
  only released shards; the ``cancel`` policy; what ``why_waiting`` says.
- Real workers (``bench_noop`` shards that sleep ``item_seconds``) on Postgres and Redis: a
  frame-by-frame chain, a failed upstream under each policy and ``farm retry``, the control
  worker SIGKILLed mid-chain.
- The dashboard's job page in a real headless Chromium says what the job waits for.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from farm.finalizer import cancel_dependents
from farm.job_spec import SpecError
from farm.scheduler import create_shards, submit_job
from farm.settings import FarmSettings
from farm.specs import parse_spec
from farm.waiting import why_waiting
from storage.access import job_scope
from storage.db import make_engine, make_session_factory, session_scope
from storage.dependencies import cancel_broken_dependents, dependents, released, upstreams
from storage.identity import add_member, create_user, principal_for
from storage.models import Artifact, Job, Shard
from storage.objects import open_store
from storage.status import JobStatus, ShardStatus
from tests.fixtures.farm import ROOT, Farm, _base_env, farm_cli, text_job

S, J = ShardStatus, JobStatus


def spec(**overrides: Any) -> Any:
    data: dict[str, Any] = {"model": "org/name", "family": "sd15", "prompts": ["a cube"], "base_seed": 1, "count": 4}
    data.update({"shard_size": 1, **overrides})
    return parse_spec(data)


def problems(**overrides: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        spec(**overrides)
    return info.value.problems


# -- the spec -------------------------------------------------------------------------------------
def test_the_spec_fields_and_their_refusals() -> None:
    ok = spec(name="frames.v2", after=["frames", "1a2b3c4d"], after_policy="run_anyway")
    assert (ok.name, ok.after, ok.after_policy, ok.after_mode) == (
        "frames.v2",
        ["frames", "1a2b3c4d"],
        "run_anyway",
        "job",
    )
    assert spec().after == [] and spec().after_policy == "wait"
    assert [p for p, _ in problems(name="a b")] == ["name"]
    assert [p for p, _ in problems(name=str(uuid.uuid4()))] == ["name"]
    assert [p for p, _ in problems(after=["frames", "Frames"])] == ["after[1]"]
    assert [p for p, _ in problems(after=["has space"])] == ["after[0]"]
    assert [p for p, _ in problems(after=[f"j{i}" for i in range(17)])] == ["after"]
    assert [p for p, _ in problems(after_policy="sometimes")] == ["after_policy"]
    ((path, reason),) = problems(after=["a", "b"], after_mode="shard")
    assert path == "after_mode" and "exactly one job in after, not 2" in reason
    assert [p for p, _ in problems(after_mode="shard")] == ["after_mode"]


# -- submit: after resolved within the submitter's scope ------------------------------------------
@pytest.fixture
def people(session_factory) -> dict[str, Any]:
    """alice in studio, bob in elsewhere (names unique per test: the Postgres database is shared)."""
    tag = uuid.uuid4().hex[:6]
    with session_scope(session_factory) as session:
        for who, project in (("alice", "studio"), ("bob", "elsewhere")):
            create_user(session, f"{who}-{tag}", "member", project=f"{project}-{tag}")
        return {who: principal_for(session, f"{who}-{tag}") for who in ("alice", "bob")}


def submit_as(session_factory, who: Any, **overrides: Any) -> uuid.UUID:
    with session_scope(session_factory) as session:
        job, _ = submit_job(
            session,
            spec(**overrides),
            owner_id=who.user_id,
            project_id=next(iter(who.projects)),
            scope=job_scope(who),
        )
        return job.id


def upstream_ids(session_factory, job_id: uuid.UUID) -> list[str]:
    with session_scope(session_factory) as session:
        return [up["id"] for up in upstreams(session, job_id)]


def test_after_names_ids_and_prefixes_resolve_within_the_submitters_scope(session_factory, people) -> None:
    alice, bob = people["alice"], people["bob"]
    first = submit_as(session_factory, alice, name="frames")
    bobs = submit_as(session_factory, bob, name="frames")
    latest = submit_as(session_factory, alice, name="frames")  # names may repeat: the latest one counts
    other = submit_as(session_factory, alice)

    by_name = submit_as(session_factory, alice, after=["frames"])
    assert upstream_ids(session_factory, by_name) == [str(latest)]
    by_ids = submit_as(session_factory, alice, after=[str(first), str(other)[:12], str(latest)])
    assert upstream_ids(session_factory, by_ids) == [str(first), str(other), str(latest)]
    assert submit_as(session_factory, bob, after=["frames"]) and bobs  # bob's own "frames"

    with pytest.raises(SpecError) as unknown:
        submit_as(session_factory, alice, after=["frames", "nothing-named-so"])
    assert [p for p, _ in unknown.value.problems] == ["after[1]"]
    assert "'nothing-named-so': no job of yours has this name" in str(unknown.value)
    with pytest.raises(SpecError) as foreign:
        submit_as(session_factory, alice, after=[str(bobs)])
    with pytest.raises(SpecError) as missing:
        submit_as(session_factory, alice, after=[str(uuid.uuid4())])
    assert [p for p, _ in foreign.value.problems] == [p for p, _ in missing.value.problems] == ["after[0]"]
    reason = foreign.value.problems[0][1].split(": ", 1)[1]
    assert reason == missing.value.problems[0][1].split(": ", 1)[1]  # another project's job: as none at all
    with session_scope(session_factory) as session:
        refused = session.scalar(select(func.count()).select_from(Job).where(Job.owner_id == alice.user_id))
    assert refused == 5  # the refused submits stored nothing


def test_a_cancel_policy_job_after_a_failed_upstream_is_cancelled_at_submit(session_factory, people) -> None:
    alice = people["alice"]
    upstream = submit_as(session_factory, alice, name="broken")
    with session_scope(session_factory) as session:
        session.execute(update(Job).where(Job.id == upstream).values(status=J.FAILED))
    waiting = submit_as(session_factory, alice, after=["broken"])
    cancelled = submit_as(session_factory, alice, after=["broken"], after_policy="cancel")
    with session_scope(session_factory) as session:
        assert session.get(Job, waiting).status == J.PENDING
        job = session.get(Job, cancelled)
        assert job.status == J.CANCELLED
        assert job.error == f"cancelled: upstream job {upstream} (broken) ended failed (after_policy: cancel)"


# -- the release conditions ------------------------------------------------------------------------
def split(session_factory, **overrides: Any) -> uuid.UUID:
    """A job submitted (as admin, every job in scope) and split into its shards: running."""
    with session_scope(session_factory) as session:
        job, _ = submit_job(session, spec(**overrides))
        create_shards(session, job.id)
        return job.id


def set_status(session_factory, job_id: uuid.UUID, job: JobStatus | None = None, **shards: ShardStatus) -> None:
    """Statuses written straight to the rows (``shards``: ``s0=...`` by index)."""
    with session_scope(session_factory) as session:
        if job is not None:
            session.execute(update(Job).where(Job.id == job_id).values(status=job))
        for key, status in shards.items():
            session.execute(
                update(Shard).where(Shard.job_id == job_id, Shard.index == int(key[1:])).values(status=status)
            )


def released_indexes(session_factory, job_id: uuid.UUID) -> list[int]:
    with session_scope(session_factory) as session:
        query = select(Shard.index).where(Shard.job_id == job_id, released(Shard.job_id, Shard.index))
        return sorted(session.scalars(query))


@pytest.mark.parametrize(
    ("upstream", "policy", "expected"),
    [
        (J.RUNNING, "wait", False),
        (J.SUCCEEDED, "wait", True),
        (J.PARTIAL, "wait", False),
        (J.FAILED, "wait", False),
        (J.CANCELLED, "wait", False),
        (J.RUNNING, "run_anyway", False),
        (J.SUCCEEDED, "run_anyway", True),
        (J.PARTIAL, "run_anyway", True),
        (J.FAILED, "run_anyway", True),
        (J.CANCELLED, "run_anyway", True),
        (J.FAILED, "cancel", False),
        (J.SUCCEEDED, "cancel", True),
    ],
)
def test_job_mode_releases_when_the_upstream_is_done(session_factory, upstream, policy, expected) -> None:
    first = split(session_factory)
    second = split(session_factory)
    after = split(session_factory, after=[str(first), str(second)], after_policy=policy)
    set_status(session_factory, first, J.SUCCEEDED)
    assert released_indexes(session_factory, after) == []  # the second is running
    set_status(session_factory, second, upstream)
    assert released_indexes(session_factory, after) == ([0, 1, 2, 3] if expected else [])


@pytest.mark.parametrize(("policy", "expected"), [("wait", [0]), ("run_anyway", [0, 2]), ("cancel", [0])])
def test_shard_mode_releases_shard_i_after_the_upstreams_shard_i(session_factory, policy, expected) -> None:
    upstream = split(session_factory, count=3)  # 3 shards; the dependent has 4: its shard 3 waits for the job
    after = split(session_factory, after=[str(upstream)], after_mode="shard", after_policy=policy)
    assert released_indexes(session_factory, after) == []
    set_status(session_factory, upstream, s0=S.SUCCEEDED, s1=S.RUNNING, s2=S.FAILED)
    assert released_indexes(session_factory, after) == expected
    set_status(session_factory, upstream, J.SUCCEEDED, s1=S.SUCCEEDED, s2=S.SUCCEEDED)
    assert released_indexes(session_factory, after) == [0, 1, 2, 3]


def test_the_feeder_sends_only_released_shards(tmp_path: Path) -> None:
    from farm.feeder import feed_queue
    from storage import migrate
    from storage.transitions import mark_shards_queued

    url = f"sqlite:///{tmp_path / 'feed.db'}"  # a database of its own: the feeder reads every job
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    settings = FarmSettings(_env_file=None, data_dir=tmp_path, scheduling={"window_per_queue": 50})
    try:
        upstream = split(sessions, count=2)
        by_job = split(sessions, count=2, after=[str(upstream)])
        by_shard = split(sessions, count=2, after=[str(upstream)], after_mode="shard")

        def feed() -> dict[uuid.UUID, int]:
            with session_scope(sessions) as session:
                picked = feed_queue(session, settings, "farm.gpu.sd15").dispatches
                mark_shards_queued(session, [d.shard_id for d, _ in picked])
            counts: dict[uuid.UUID, int] = {}
            for d, _ in picked:
                counts[d.job_id] = counts.get(d.job_id, 0) + 1
            return counts

        assert feed() == {upstream: 2}
        assert feed() == {}
        set_status(sessions, upstream, s0=S.SUCCEEDED)
        assert feed() == {by_shard: 1}
        set_status(sessions, upstream, J.SUCCEEDED, s1=S.SUCCEEDED)
        assert feed() == {by_job: 2, by_shard: 1}
    finally:
        engine.dispose()


def test_the_cancel_policy_cancels_dependents_and_theirs_in_turn(session_factory, tmp_path: Path) -> None:
    settings = FarmSettings(_env_file=None, data_dir=tmp_path)
    store = open_store(settings.storage, settings.data_dir)
    upstream = split(session_factory)
    with session_scope(session_factory) as session:  # unsplit dependents: PENDING, no shards
        first, _ = submit_job(session, spec(after=[str(upstream)], after_policy="cancel", name="first"))
        second, _ = submit_job(session, spec(after=[str(first.id)], after_policy="cancel"))
        patient, _ = submit_job(session, spec(after=[str(upstream)]))
        first, second, patient = first.id, second.id, patient.id
    running = split(session_factory, after=[str(upstream)], after_policy="cancel")
    finished = split(session_factory, after=[str(upstream)], after_policy="cancel")
    set_status(session_factory, finished, **{f"s{i}": S.SUCCEEDED for i in range(4)})
    assert cancel_dependents(session_factory, store, [upstream]) == 0  # the upstream runs
    set_status(session_factory, upstream, J.PARTIAL)
    with session_scope(session_factory) as session:  # one step: the direct dependents
        assert sorted(cancel_broken_dependents(session, upstream_ids=[upstream])) == sorted([first, running])
    with session_scope(session_factory) as session:
        assert session.get(Job, first).error == (
            f"cancelled: upstream job {upstream} ended partial (after_policy: cancel)"
        )
        assert session.scalar(select(func.count()).where(Shard.job_id == running, Shard.status != S.CANCELLED)) == 0
        assert session.get(Job, second).status == J.PENDING
        assert session.get(Job, patient).status == J.PENDING  # after_policy wait: it waits
        assert session.get(Job, finished).status == J.RUNNING  # every shard ended: the finalizer decides
    assert cancel_dependents(session_factory, store, [first]) == 1  # the next step: second
    with session_scope(session_factory) as session:
        error = session.get(Job, second).error
        assert error == f"cancelled: upstream job {first} (first) ended cancelled (after_policy: cancel)"
        assert session.get(Job, patient).status == J.PENDING
    assert cancel_dependents(session_factory, store, [upstream, first]) == 0


def test_cancel_dependents_follows_a_chain_in_one_call(session_factory, tmp_path: Path) -> None:
    settings = FarmSettings(_env_file=None, data_dir=tmp_path)
    upstream = split(session_factory)
    chain = [upstream]
    with session_scope(session_factory) as session:
        for _ in range(3):
            job, _ = submit_job(session, spec(after=[str(chain[-1])], after_policy="cancel"))
            chain.append(job.id)
    set_status(session_factory, upstream, J.FAILED)
    assert cancel_dependents(session_factory, open_store(settings.storage, settings.data_dir), [upstream]) == 3
    with session_scope(session_factory) as session:
        assert [session.get(Job, j).status for j in chain[1:]] == [J.CANCELLED] * 3


def test_a_reconciler_pass_cancels_and_releases_what_lost_messages_left(sqlite_url: str, tmp_path: Path) -> None:
    """Upstreams that ended with nobody to act on it (the finalize message lost): one pass cancels
    the cancel-policy dependent and sends the released dependent's shards."""
    from farm.celery_app import create_app
    from farm.reconciler import Reconciler

    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data", db={"url": sqlite_url})
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    app = create_app(settings)
    try:
        failed, succeeded = split(sessions, count=2), split(sessions, count=2)
        doomed = split(sessions, count=2, after=[str(failed)], after_policy="cancel")
        released_job = split(sessions, count=2, after=[str(succeeded)])
        held = split(sessions, count=2, after=[str(failed)])
        set_status(sessions, failed, J.FAILED, s0=S.FAILED, s1=S.FAILED)  # their ends told nobody
        set_status(sessions, succeeded, J.SUCCEEDED, s0=S.SUCCEEDED, s1=S.SUCCEEDED)
        store = open_store(settings.storage, settings.data_dir)
        report = Reconciler(settings, sessions, app, store).run_pass()
        assert report.dependents_cancelled == 1 and not report.errors, report
        with session_scope(sessions) as session:
            statuses = dict(session.execute(select(Shard.job_id, Shard.status).where(Shard.index == 0)).all())
            assert session.get(Job, doomed).status == J.CANCELLED
        assert statuses[released_job] == S.QUEUED and statuses[held] == S.PENDING
        assert report.fed == 2
    finally:
        app.close()
        engine.dispose()


def test_why_waiting_names_the_upstream_and_what_it_waits_for(session_factory, tmp_path: Path) -> None:
    settings = FarmSettings(_env_file=None, data_dir=tmp_path)
    upstream = split(session_factory, name="frames")
    by_job = split(session_factory, after=[str(upstream)])
    by_shard = split(session_factory, after=[str(upstream)], after_mode="shard")
    short = str(upstream)[:8]

    def reasons(job_id: uuid.UUID) -> list[str]:
        with session_scope(session_factory) as session:
            return why_waiting(session, job_id, settings)

    assert reasons(by_job)[0] == f"after job {short} (frames): running, 0/4 shards done"
    set_status(session_factory, upstream, s0=S.SUCCEEDED, s1=S.QUEUED)
    assert reasons(by_shard)[0] == (
        f"3 shard(s) wait for the same shards of job {short} (frames), running: shard 1 waits for its shard 1 (queued)"
    )
    set_status(session_factory, upstream, J.FAILED)
    assert (
        reasons(by_job)[0]
        == f"after job {short} (frames): failed; waits until it is retried and succeeds (farm retry {short})"
    )
    set_status(session_factory, upstream, J.SUCCEEDED)
    assert not any("after" in r for r in reasons(by_job) + reasons(by_shard))


def test_a_linked_job_in_another_project_shows_only_its_status(session_factory, people, tmp_path: Path) -> None:
    """Carol is in both projects and chains her studio job into an elsewhere job: bob (elsewhere
    only) sees that his project's job waits for "a job you may not open", never its id or name;
    alice (studio only) sees the same of the job waiting for hers. Carol and the admin see both."""
    settings = FarmSettings(_env_file=None, data_dir=tmp_path)
    alice, bob = people["alice"], people["bob"]
    studio, elsewhere = next(iter(alice.projects)), next(iter(bob.projects))
    tag = alice.name.split("-", 1)[1]
    with session_scope(session_factory) as session:
        create_user(session, f"carol-{tag}", "member", project=f"studio-{tag}")
        add_member(session, f"carol-{tag}", f"elsewhere-{tag}")
        carol = principal_for(session, f"carol-{tag}")
    ids = {}
    for project, name, after in ((studio, "secret-frames", []), (elsewhere, "video", ["secret-frames"])):
        with session_scope(session_factory) as session:
            job, _ = submit_job(
                session,
                spec(name=name, after=after),
                owner_id=carol.user_id,
                project_id=project,
                scope=job_scope(carol),
            )
            create_shards(session, job.id)
            ids[name] = job.id
    upstream, downstream = ids["secret-frames"], ids["video"]
    with session_scope(session_factory) as session:
        (hidden_up,) = upstreams(session, downstream, job_scope(bob))
        (hidden_down,) = dependents(session, upstream, job_scope(alice))
        reasons = why_waiting(session, downstream, settings, scope=job_scope(bob))
        (shown_up,) = upstreams(session, downstream, job_scope(carol))
        (admins,) = dependents(session, upstream)
    assert hidden_up == {"id": None, "name": None, "status": "running", "mode": "job", "policy": "wait", "hidden": True}
    assert hidden_down["hidden"] and hidden_down["id"] is None and hidden_down["kind"] is None
    assert reasons[0] == "after a job you may not open: running, 0/4 shards done", reasons
    seen = repr((hidden_up, hidden_down, reasons))
    assert str(upstream)[:8] not in seen and "secret-frames" not in seen and str(downstream)[:8] not in seen
    assert shown_up["id"] == str(upstream) and shown_up["name"] == "secret-frames" and not shown_up["hidden"]
    assert admins["id"] == str(downstream) and admins["kind"] == "text_to_image"


# -- with real workers ----------------------------------------------------------------------------
QUEUES = ["farm.gpu.sd15"]


class Chain:
    """A farm on Postgres and Redis with a control worker and two render workers (``bench_noop``
    jobs), and direct access to its tables."""

    def __init__(self, farm: Farm, model: Path) -> None:
        self.farm, self.model = farm, model
        self.engine = make_engine(farm.settings().database_url)
        self.sessions = make_session_factory(self.engine)
        self.client = farm.client()

    def submit(self, shards: int, item_seconds: float = 0.0, **overrides: Any) -> uuid.UUID:
        data = {
            "kind": "bench_noop",
            "model": str(self.model),
            "family": "sd15",
            "prompts": ["a frame"],
            "base_seed": 1,
            "count": shards,
            "steps": 1,
            "width": 64,
            "height": 64,
            "shard_size": 1,
            "output_prefix": f"chain-{uuid.uuid4().hex[:6]}",
            "item_seconds": item_seconds,
            **overrides,
        }
        return self.client.submit_parsed(parse_spec(data)).job_id

    def shards(self, job_id: uuid.UUID) -> list[Any]:
        with session_scope(self.sessions) as session:
            return session.execute(
                select(
                    Shard.index, Shard.status, Shard.started_at, Shard.finished_at, Shard.attempts, Shard.fencing_token
                )
                .where(Shard.job_id == job_id)
                .order_by(Shard.index)
            ).all()

    def artifacts(self, job_id: uuid.UUID) -> int:
        with session_scope(self.sessions) as session:
            return int(session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)))

    def status(self, job_id: uuid.UUID) -> str:
        return self.client.get(job_id, shards=0)["status"]

    def wait_for(self, what: str, check: Any, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``farm ARGS`` through a pipe, 60 columns."""
        env = {**self.farm.env, "COLUMNS": "60"}
        cmd = [sys.executable, "-m", "farm", *args]
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()


@pytest.fixture(scope="module")
def chain(tmp_path_factory, pg_database_factory, redis_url, tiny_models, bench_kind) -> Iterator[Chain]:
    from storage import migrate

    tmp = tmp_path_factory.mktemp("deps")
    env = {
        **_base_env(tmp),
        "FARM_BROKER__URL": redis_url,
        "FARM_DB__URL": pg_database_factory(),
        "FARM_SCHEDULING__WINDOW_PER_QUEUE": "1",  # the broker holds little more than the workers run
        "FARM_WORKER__ROLLUP_INTERVAL_S": "1",
        "FARM_RECONCILE__INTERVAL_S": "1",
        "FARM_RECONCILE__STUCK_AFTER_S": "3",
    }
    farm = Farm(env, tmp)
    migrate.upgrade(farm.settings().database_url)
    farm.start_workers(["farm.control"], ["control"], module="bench.farm_worker")
    farm.start_workers(QUEUES, ["gpu-0", "gpu-1"], module="bench.farm_worker")
    made = Chain(farm, tiny_models["sd15"])
    try:
        yield made
    finally:
        made.close()
        farm.stop()


@pytest.mark.integration
def test_a_frame_by_frame_chain_starts_downstream_shards_before_the_upstream_ends(chain: Chain) -> None:
    upstream = chain.submit(6, item_seconds=0.6, name="frames")
    # Priority 9: once a frame is done, its next step goes before the upstream's remaining frames.
    downstream = chain.submit(6, item_seconds=0.05, after=["frames"], after_mode="shard", priority=9)
    assert chain.client.wait(downstream, timeout=180)["status"] == "succeeded"
    assert chain.client.wait(upstream, timeout=60)["status"] == "succeeded"
    up, down = chain.shards(upstream), chain.shards(downstream)
    for mine, theirs in zip(down, up, strict=True):  # shard i ran only after the upstream's shard i
        assert mine.started_at >= theirs.finished_at, (mine.index, mine.started_at, theirs.finished_at)
    assert down[0].started_at < max(s.finished_at for s in up), "the chain ran frame by frame, not job by job"
    assert chain.artifacts(upstream) == chain.artifacts(downstream) == 6


@pytest.mark.integration
def test_a_failed_upstream_under_each_policy_and_farm_retry(chain: Chain, tmp_path: Path) -> None:
    trigger = tmp_path / "fail-while-this-exists"
    trigger.write_text("")
    upstream = chain.submit(2, name="flaky", fail_while=str(trigger))
    waits = chain.submit(2, after=["flaky"])
    cancelled = chain.submit(2, after=["flaky"], after_policy="cancel")
    anyway = chain.submit(2, after=["flaky"], after_policy="run_anyway")

    assert chain.client.wait(upstream, timeout=120)["status"] == "failed"
    assert chain.client.wait(anyway, timeout=120)["status"] == "succeeded"
    gone = chain.client.wait(cancelled, timeout=60)
    assert gone["status"] == "cancelled"
    assert gone["error"] == f"cancelled: upstream job {upstream} (flaky) ended failed (after_policy: cancel)"
    assert chain.artifacts(cancelled) == 0

    short = str(upstream)[:8]
    status = chain.cli("status", str(waits)[:8])
    assert status.returncode == 0, status.stderr
    assert f"after: job {short} (flaky) failed (mode job, policy wait)" in status.stdout, status.stdout
    assert f"waiting: after job {short} (flaky): failed; waits until it is retried and succeeds" in status.stdout
    assert chain.status(waits) == "running" and all(s.status == S.PENDING for s in chain.shards(waits))

    trigger.unlink()
    retried = chain.cli("retry", short)
    assert retried.returncode == 0 and "re-queued 2 failed shard(s)" in retried.stdout, retried.stdout + retried.stderr
    assert chain.client.wait(waits, timeout=120)["status"] == "succeeded"
    assert chain.status(upstream) == "succeeded"
    assert chain.shards(waits)[0].started_at >= max(s.finished_at for s in chain.shards(upstream))
    assert chain.artifacts(waits) == 2


@pytest.mark.integration
def test_the_control_worker_killed_mid_chain_resumes_without_rerunning_finished_work(chain: Chain) -> None:
    first = chain.submit(6, item_seconds=0.4, name="stage-1")
    second = chain.submit(4, item_seconds=0.1, after=["stage-1"], name="stage-2")
    third = chain.submit(4, item_seconds=0.1, after=["stage-2"], after_mode="shard")
    control = next(w for w in chain.farm.workers if w.name == "control")
    chain.wait_for("half the first stage", lambda: sum(s.status == S.SUCCEEDED for s in chain.shards(first)) >= 2)
    control.kill()  # SIGKILL: whatever it held or had in flight is lost
    chain.wait_for("the first stage's shards", lambda: all(s.status == S.SUCCEEDED for s in chain.shards(first)))
    time.sleep(2)  # nobody finalizes the first stage: the second must not start
    assert chain.status(first) == "running" and all(s.started_at is None for s in chain.shards(second))
    chain.farm.start_workers(["farm.control"], ["control-2"], module="bench.farm_worker")

    assert chain.client.wait(third, timeout=180)["status"] == "succeeded"
    for job_id, items in ((first, 6), (second, 4), (third, 4)):
        assert chain.status(job_id) == "succeeded"
        shards = chain.shards(job_id)
        assert [(s.attempts, s.fencing_token) for s in shards] == [(1, 1)] * items, "finished work ran again"
        assert chain.artifacts(job_id) == items
    assert min(s.started_at for s in chain.shards(second)) >= max(s.finished_at for s in chain.shards(first))


@pytest.mark.integration
def test_the_broker_emptied_mid_chain_still_ends_every_job_once(chain: Chain) -> None:
    """An unlisted fault: Redis loses every message (a restart without persistence) while a chain
    runs and its dependent shards wait. The database still holds the chain; the reconciler sends
    what the broker lost, so every job ends, each shard's outputs once."""
    import redis

    first = chain.submit(6, item_seconds=0.4, name="flush-1")
    second = chain.submit(4, item_seconds=0.1, after=["flush-1"], after_mode="shard")
    third = chain.submit(2, item_seconds=0.1, after=[str(second)])
    chain.wait_for(
        "two shards of the first stage", lambda: sum(s.status == S.SUCCEEDED for s in chain.shards(first)) >= 2
    )
    broker = redis.Redis.from_url(chain.farm.env["FARM_BROKER__URL"])
    dropped = broker.dbsize()
    broker.flushdb()  # queued messages, unacked deliveries, kombu's bindings: all gone

    for job_id, items in ((third, 2), (second, 4), (first, 6)):  # each ends (a lost finalize is re-sent)
        assert chain.client.wait(job_id, timeout=180)["status"] == "succeeded"
        assert chain.artifacts(job_id) == items, "each shard's output once"
    up, down = chain.shards(first), chain.shards(second)
    for mine, theirs in zip(down, up, strict=False):  # the release still held: shard i after shard i
        assert mine.started_at >= theirs.finished_at
    print(f"flushed {dropped} broker keys mid-chain; 3 jobs succeeded, 12 artifacts")


# -- the API and the dashboard --------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_the_job_page_says_what_the_job_waits_for(
    tmp_path_factory, tiny_models, pg_database_factory, redis_url, chromium
):
    from storage import migrate
    from tests.fixtures.api import ApiServer, add_person
    from tests.test_web_dashboard import logged_in, set_password, shot, submit

    tmp = tmp_path_factory.mktemp("deps-dashboard")
    # A broker of its own: the module's chain farm (on the session's Redis) still runs its control worker.
    env = {**_base_env(tmp), "FARM_BROKER__URL": "filesystem://", "FARM_DB__URL": pg_database_factory()}
    farm = Farm(env, tmp)
    migrate.upgrade(farm.settings().database_url)
    farm.start_worker(["farm.control"], name="deps-control")  # no render worker: everything waits
    server = ApiServer(farm, tmp / "api.log").wait_ready()
    try:
        alice = add_person(farm, server, "alice", "member", project="studio")
        bob = add_person(farm, server, "bob", "member", project="elsewhere")
        set_password(farm, "alice", "alice's long password")
        model = tiny_models["sd15"]
        frames = submit(alice, text_job(model, name="frames", output_prefix="frames"))
        bobs = submit(bob, text_job(model, output_prefix="bobs"))
        with alice.http() as http:
            refused = http.post("/v1/jobs", json={"spec": text_job(model, after=[bobs])})
            unknown = http.post("/v1/jobs", json={"spec": text_job(model, after=["framez"])})
        for answer in (refused, unknown):
            assert answer.status_code == 422, answer.text
            assert [p["field"] for p in answer.json()["error"]["problems"]] == ["after[0]"], answer.text
        video = submit(alice, text_job(model, after=["frames"], after_mode="shard", output_prefix="video"))

        deadline = time.monotonic() + 60
        with alice.http() as http:
            while not any("the same shards" in r for r in http.get(f"/v1/jobs/{video}").json()["waiting"]):
                assert time.monotonic() < deadline, http.get(f"/v1/jobs/{video}").json()
                time.sleep(0.3)
        context, page = logged_in(chromium, server, "alice", "alice's long password")
        try:
            page.goto(f"/jobs/{video}")
            after = page.locator("#job-after")
            assert frames[:8] in after.inner_text() and "frames" in after.inner_text()
            assert "running" in after.inner_text() and "shard by shard" in after.inner_text()
            waiting = page.locator(".waiting").all_inner_texts()
            expected = f"3 shard(s) wait for the same shards of job {frames[:8]} (frames), running: shard 0 waits"
            assert any(expected in w for w in waiting), waiting
            after.locator("a").first.click()
            page.wait_for_url(f"**/jobs/{frames}")
            page.go_back()
            page.wait_for_url(f"**/jobs/{video}")
            shot(page, "job-after")  # with FARM_SCREENSHOTS=DIR
            page.goto(f"/jobs/{frames}")
            assert video[:8] in page.locator("#job-then").inner_text()
            shot(page, "job-then")
        finally:
            context.close()

        # Carol, in both projects, chains a studio job into an elsewhere job: bob sees his
        # project's job wait for "a job you may not open", without its id, name or a link.
        carol = add_person(farm, server, "carol", "member", project="studio")
        with farm.session() as session:
            add_member(session, "carol", "elsewhere")
        set_password(farm, "bob", "bob's long password")
        with carol.http() as http:
            made = []
            for project, job in (
                ("studio", text_job(model, name="carols-frames", output_prefix="carol")),
                ("elsewhere", text_job(model, after=["carols-frames"], output_prefix="cv")),
            ):
                answer = http.post("/v1/jobs", json={"spec": job, "project": project})
                assert answer.status_code == 201, answer.text
                made.append(answer.json()["job_id"])
        hers, chained = made
        with bob.http() as http:
            summary = http.get(f"/v1/jobs/{chained}").json()
        assert summary["after"][0]["hidden"] and summary["after"][0]["id"] is None, summary["after"]
        assert hers[:8] not in repr(summary) and "carols-frames" not in repr(summary)
        status = farm_cli(bob.env(), "status", chained, cwd=tmp)  # through the API, in a narrow pipe
        assert status.returncode == 0, status.stderr
        assert "after: a job you may not open running (mode job, policy wait)" in status.stdout, status.stdout
        assert hers[:8] not in status.stdout and "carols" not in status.stdout
        print(status.stdout)
        context, page = logged_in(chromium, server, "bob", "bob's long password")
        try:
            page.goto(f"/jobs/{chained}")
            after = page.locator("#job-after").inner_text()
            assert "a job you may not open" in after and hers[:8] not in after and "carols" not in after
            assert page.locator("#job-after a").count() == 0
            assert hers[:8] not in page.content()
            shot(page, "job-after-hidden")
        finally:
            context.close()
    finally:
        server.stop()
        farm.stop()
