"""``farm rerun``: a new job from a job's stored spec, with ``--set`` overrides, or only the items
it did not render.

- The pieces without services: ``--set`` paths and values, ``only_items`` (validated, and the
  shards keep each item's index, seed and prompt), overrides that would change the failed items.
- With real workers on Redis and Postgres, through the CLI in a pipe (COLUMNS=60): a worker fails
  shards 0 and 2 of a 6-item job on purpose (``worker.fail_shards``); ``farm rerun --only-failed
  --set steps=30`` on a healthy worker renders exactly the 4 failed items (same indexes, seeds,
  prompts; 30 steps; the changed prompt) under the new job's id; the parent's rows and outputs
  are untouched; a bad ``--set`` is refused naming its field; a job with nothing failed is refused.
- Through the API: another project's job is not found (by id and by prefix), a viewer may not re-run,
  a member's re-run is their own in the job's project, a still-running job is refused for
  ``--only-failed``, and each call is audited.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from farm.errors import Forbidden, NotFound, UserError
from farm.job_spec import SpecError
from farm.reruns import RerunPlan
from farm.sharding import plan_shards
from farm.spec_overrides import apply_overrides, parse_sets
from farm.specs import parse_spec
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, AuditEvent, Job, User
from tests.fixtures.api import add_person
from tests.fixtures.farm import ROOT, text_job

BASE = {"model": "org/model", "family": "sd15", "prompts": ["a", "b", "c"], "base_seed": 7, "count": 2}


# -- without services ----------------------------------------------------------------------------
def test_set_values_are_json_when_they_parse_else_text() -> None:
    sets = parse_sets(["steps=30", "seeds=[1,2,3]", "prompts.0=a cat", "negative_prompt=", "guidance=7.5"])
    assert sets == {"steps": 30, "seeds": [1, 2, 3], "prompts.0": "a cat", "negative_prompt": "", "guidance": 7.5}
    changed = apply_overrides(BASE, sets)
    assert changed["prompts"] == ["a cat", "b", "c"] and changed["steps"] == 30
    assert "base_seed" not in changed and "count" not in changed, "seeds replaces the other seed form"
    assert apply_overrides({"seeds": [1]}, {"base_seed": 5, "count": 2}) == {"base_seed": 5, "count": 2}
    assert apply_overrides(BASE, {"prompts.3": "d"})["prompts"] == ["a", "b", "c", "d"]  # one past the end
    assert BASE["prompts"] == ["a", "b", "c"], "the spec given is not changed"
    for bad, field in (
        (["steps"], "steps"),
        (["=3"], "=3"),
    ):
        with pytest.raises(SpecError) as refused:
            parse_sets(bad)
        assert refused.value.problems[0][0] == field
    for path, value, field, reason in (
        ("prompts.7", "x", "prompts.7", "index out of range"),
        ("prompts.x", "x", "prompts.x", "is a list"),
        ("model.name", 1, "model.name", "single value"),
        ("steps.0", 1, "steps.0", "not a list"),
        ("0", 1, "0", "starts with a field name"),
        ("a..b", 1, "a..b", "not a field path"),
    ):
        with pytest.raises(SpecError) as refused:
            apply_overrides(BASE, {path: value})
        assert refused.value.problems[0][0] == field and reason in refused.value.problems[0][1]


def test_only_items_keep_their_index_seed_and_prompt() -> None:
    full = [item for shard in plan_shards(parse_spec(BASE), "parent") for item in shard.items]
    spec = parse_spec({**BASE, "only_items": [1, 4, 5], "shard_size": 2})
    assert spec.item_count() == 3
    shards = plan_shards(spec, "child")
    assert [[item.index for item in shard.items] for shard in shards] == [[1, 4], [5]]
    picked = [item for shard in shards for item in shard.items]
    assert [(i.index, i.seed, i.prompt_index) for i in picked] == [
        (i.index, i.seed, i.prompt_index) for i in full if i.index in (1, 4, 5)
    ]
    assert all(item.key.startswith("renders/child/") for item in picked)
    for bad, reason in (([6], "the job has 6 items"), ([2, 2], "ascending"), ([3, 1], "ascending")):
        with pytest.raises(SpecError) as refused:
            parse_spec({**BASE, "only_items": bad})
        assert refused.value.problems[0][0].startswith("only_items[") and reason in str(refused.value)
    with pytest.raises(SpecError, match="only_items"):
        parse_spec({**BASE, "only_items": []})


def test_overrides_may_not_change_what_the_failed_items_are() -> None:
    failed = {4: {"index": 4, "prompt_index": 2, "seed": 7, "key": "k"}}
    plan = RerunPlan(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), {}, failed)
    same = parse_spec({**BASE, "prompts": ["a", "b", "a new c"], "steps": 30, "only_items": [4]})
    assert plan.check(same) is same  # a prompt's text and the steps may change
    with pytest.raises(SpecError) as refused:
        plan.check(parse_spec({**BASE, "base_seed": 70, "only_items": [4]}))
    assert refused.value.problems[0][0] == "only_items" and "seed 7 -> 70" in str(refused.value)


# -- with real workers ---------------------------------------------------------------------------
def cli(farm, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``farm ARGS`` through a pipe in a 60-column terminal."""
    return subprocess.run(
        [sys.executable, "-m", "farm", *args],
        env={**(env or farm.env), "COLUMNS": "60"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _artifacts(sessions, job_id: str) -> list[tuple[int, int, str, str, int, str]]:
    with session_scope(sessions) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == uuid.UUID(job_id)))
        return sorted(
            (a.item_index, a.seed, a.key, a.sha256, a.params.get("steps"), a.params.get("prompt")) for a in rows
        )


@pytest.mark.integration
@pytest.mark.slow
def test_rerun_only_failed_renders_exactly_the_failed_items(
    farm_factory, tiny_models, pg_url, redis_url, tmp_path: Path
) -> None:
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    broken = farm.start_worker(["farm.control", "farm.gpu.sd15"], name="rerun-broken", FARM_WORKER__FAIL_SHARDS="[0,2]")
    key = f"rerun-{uuid.uuid4().hex[:8]}"
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(text_job(tiny_models["sd15"], steps=2, idempotency_key=key)))
    submitted = cli(farm, "submit", str(spec_file), "--wait")
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr  # it ended partial
    parent = submitted.stdout.split("submitted job ")[1].split()[0]
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        before = session.get(Job, uuid.UUID(parent))
        parent_row = (before.status, before.spec, before.items_done, before.items_failed, before.finished_at)
    assert parent_row[0] == "partial"
    parent_outputs = _artifacts(sessions, parent)
    assert [a[:2] for a in parent_outputs] == [(2, 7), (3, 8)]  # shard 1: items 2 and 3

    broken.stop()
    farm.start_worker(["farm.control", "farm.gpu.sd15"], name="rerun-healthy")
    refused = cli(farm, "rerun", parent[:8], "--only-failed", "--set", "steps=abc")
    assert refused.returncode == 2 and "steps" in refused.stderr and "Traceback" not in refused.stderr
    moved = cli(farm, "rerun", parent[:8], "--only-failed", "--set", "base_seed=70")
    assert moved.returncode == 2 and "only_items: the overrides change failed item 0" in moved.stderr

    done = cli(
        farm,
        "rerun",
        parent[:8],
        "--only-failed",
        "--set",
        "steps=30",
        "--set",
        "prompts.0=a red cube at night",
        "--wait",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    words = " ".join(done.stdout.split())
    assert f"a re-run of job {parent} (its failed items: 4)" in words, words
    child = done.stdout.split("submitted job ")[1].split(":")[0]
    outputs = _artifacts(sessions, child)
    assert [(index, seed) for index, seed, *_ in outputs] == [(0, 7), (1, 8), (4, 7), (5, 8)]
    assert {steps for *_, steps, _ in outputs} == {30}
    assert [prompt for *_, prompt in outputs] == ["a red cube at night"] * 2 + ["a green cone"] * 2
    assert all(f"/{child}/" in out_key for _, _, out_key, *_ in outputs), "under the re-run's own id"
    with session_scope(sessions) as session:
        row = session.get(Job, uuid.UUID(child))
        assert (row.status, str(row.parent_job_id), row.items_total) == ("succeeded", parent, 4)
        assert row.spec["only_items"] == [0, 1, 4, 5] and row.spec["steps"] == 30
        assert row.idempotency_key is None and row.spec.get("idempotency_key") is None
        after = session.get(Job, uuid.UUID(parent))
        assert (after.status, after.spec, after.items_done, after.items_failed, after.finished_at) == parent_row
    assert _artifacts(sessions, parent) == parent_outputs, "the parent is untouched"

    status = cli(farm, "status", child[:8])
    assert f"re-run of job {parent}" in status.stdout, status.stdout
    assert json.loads(cli(farm, "status", child[:8], "--json").stdout)["parent_job_id"] == parent
    nothing = cli(farm, "rerun", child[:8], "--only-failed")
    assert nothing.returncode == 2 and "has no failed items" in " ".join(nothing.stderr.split())
    engine.dispose()


@pytest.mark.integration
def test_rerun_through_the_api_respects_projects(farm_factory, api_server_factory, tiny_models, pg_url, redis_url):
    farm = farm_factory(broker=redis_url, db_url=pg_url)  # no worker: the jobs wait
    server = api_server_factory(farm)
    tag = uuid.uuid4().hex[:6]
    alice = add_person(farm, server, f"alice-{tag}", "member", project=f"studio-{tag}")
    bob = add_person(farm, server, f"bob-{tag}", "member", project=f"elsewhere-{tag}")
    carol = add_person(farm, server, f"carol-{tag}", "viewer", project=f"studio-{tag}")
    dave = add_person(farm, server, f"dave-{tag}", "member", project=f"studio-{tag}")
    with alice.client() as client:
        job = str(client.submit(text_job(tiny_models["sd15"], output_prefix=f"api-rerun-{tag}")))

    with bob.client() as client:
        for ref in (job, job[:8]):
            with pytest.raises(NotFound):
                client.rerun(ref, overrides={"steps": 30})
    with carol.client() as client, pytest.raises(Forbidden):
        client.rerun(job)
    with alice.client() as client:
        with pytest.raises(UserError, match="still pending"):
            client.rerun(job, only_failed=True)
        with pytest.raises(SpecError) as refused:
            client.rerun(job, overrides={"steps": "many"})
        assert refused.value.problems[0][0] == "steps"
        with pytest.raises(SpecError) as refused:
            client.rerun(job, overrides={"negative_prompt": {"path": "/etc/hostname"}})  # a file of the server's
        assert refused.value.problems[0][0] == "spec.negative_prompt" and "your machine" in refused.value.problems[0][1]
    with dave.client() as client:  # another member of the project: the re-run is dave's
        done = client.rerun(job[:8], overrides={"steps": 31})
        assert (done["parent_job_id"], done["items_total"], done["only_failed"]) == (job, 6, False)
        summary = client.get(done["job_id"])
    assert (summary["parent_job_id"], summary["owner"], summary["project"]) == (job, dave.name, f"studio-{tag}")

    through_cli = cli(farm, "rerun", job[:8], "--set", "steps=32", env=alice.env())
    assert through_cli.returncode == 0, through_cli.stderr
    assert f"a re-run of job {job} (all its items: 6)" in " ".join(through_cli.stdout.split())

    engine = make_engine(pg_url)
    with session_scope(make_session_factory(engine)) as session:
        rows = session.execute(
            select(User.name, Job.spec["steps"].as_integer())
            .join(User, User.id == Job.owner_id)
            .where(Job.parent_job_id == uuid.UUID(job))
        ).all()
        audit = session.execute(
            select(AuditEvent.actor, AuditEvent.status).where(
                AuditEvent.action == "job.rerun", AuditEvent.actor.like(f"%-{tag}")
            )
        ).all()
    engine.dispose()
    assert sorted(rows) == [(alice.name, 32), (dave.name, 31)]
    assert sorted(audit) == sorted(
        [
            (bob.name, 404),
            (bob.name, 404),
            (carol.name, 403),
            *[(alice.name, 422)] * 3,
            (dave.name, 201),
            (alice.name, 201),
        ]
    )
