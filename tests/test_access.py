"""Who may do what (storage.access): the rules as a table, the SQL scopes on real SQLite and
Postgres, and ownership recorded by submits."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from farm import bulk
from farm.bulk_manifest import read_manifest
from farm.errors import Forbidden, UserError
from farm.scheduler import job_summary, submit_job
from farm.specs import parse_spec
from storage import access
from storage import identity as ident
from storage.identity import Principal
from storage.models import BulkJob, Job
from storage.status import Role

ME, OTHER = uuid.uuid4(), uuid.uuid4()
MINE, MANAGED, ELSEWHERE = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()  # projects


def principal(role: Role, *, manages: bool = False) -> Principal:
    """ME in project MINE (managing it when ``manages``)."""
    return Principal(ME, "me", role, {MINE: manages}, {"mine": MINE})


ADMIN = Principal(ME, "root", Role.ADMIN, {MINE: True, ELSEWHERE: True}, {"default": MINE, "other": ELSEWHERE})
MEMBER = principal(Role.MEMBER)
MANAGER = principal(Role.MEMBER, manages=True)
VIEWER = principal(Role.VIEWER)
VIEWER_MANAGER = principal(Role.VIEWER, manages=True)  # the manager flag gives a viewer nothing

JOBS = {"own job": (ME, MINE), "other's job in project": (OTHER, MINE), "job of another project": (OTHER, ELSEWHERE)}
# principal: (can read, can change) for each of JOBS, in order
RULES = {
    "admin": (ADMIN, [(True, True), (True, True), (True, True)]),
    "member": (MEMBER, [(True, True), (True, False), (False, False)]),
    "manager": (MANAGER, [(True, True), (True, True), (False, False)]),
    "viewer": (VIEWER, [(True, False), (True, False), (False, False)]),
    "viewer with manager flag": (VIEWER_MANAGER, [(True, False), (True, False), (False, False)]),
}


@pytest.mark.parametrize("who", list(RULES))
@pytest.mark.parametrize("job", list(JOBS))
def test_read_and_change_rules(who: str, job: str) -> None:
    p, expected = RULES[who]
    owner, project = JOBS[job]
    assert (access.can_read(p, owner, project), access.can_change(p, owner, project)) == expected[list(JOBS).index(job)]


def test_a_member_of_no_project_sees_and_changes_nothing() -> None:
    lonely = Principal(ME, "me", Role.MEMBER)
    assert not access.can_read(lonely, ME, MINE) and not access.can_change(lonely, ME, MINE)
    with pytest.raises(Forbidden, match="not a member of any project"):
        access.submit_project(lonely, None)


def test_the_project_a_submit_goes_into() -> None:
    assert access.submit_project(MEMBER, None) == MINE
    assert access.submit_project(MEMBER, "mine") == MINE
    with pytest.raises(Forbidden, match="not a member of project 'other'"):
        access.submit_project(MEMBER, "other")
    with pytest.raises(Forbidden, match="viewers may not submit"):
        access.submit_project(VIEWER, None)
    with pytest.raises(Forbidden, match="viewers may not submit"):
        access.submit_project(VIEWER, "mine")
    two = Principal(ME, "me", Role.MEMBER, {MINE: False, MANAGED: True}, {"mine": MINE, "managed": MANAGED})
    with pytest.raises(UserError, match=r"several projects \(managed, mine\)"):
        access.submit_project(two, None)
    assert access.submit_project(two, "managed") == MANAGED
    assert access.submit_project(ADMIN, None) == MINE  # "default"
    assert access.submit_project(ADMIN, "other") == ELSEWHERE
    with pytest.raises(UserError, match="no project 'nope'"):
        access.submit_project(ADMIN, "nope")
    with pytest.raises(UserError, match="no 'default' project"):
        access.submit_project(Principal(ME, "root", Role.ADMIN), None)


def test_priority_cap() -> None:
    access.check_priority(MEMBER, 5, member_cap=5)
    access.check_priority(ADMIN, 9, member_cap=5)
    with pytest.raises(Forbidden, match="priority 6 is above 5, the most a member may set"):
        access.check_priority(MANAGER, 6, member_cap=5)
    with pytest.raises(Forbidden, match="the most a viewer may set"):
        access.check_priority(VIEWER, 6, member_cap=5)


# -- on real databases ------------------------------------------------------------------------------
SPEC = {
    "model": "/models/tiny",
    "family": "sd15",
    "prompts": ["a"],
    "seeds": [1],
    "steps": 2,
    "width": 64,
    "height": 64,
    "output_prefix": "acl",
}


@pytest.fixture
def people(session):
    """ann (member of a, manages b), bo (member of a), vi (viewer of b), the admin; their jobs."""
    tag = uuid.uuid4().hex[:8]
    ident.create_user(session, f"ann-{tag}", Role.MEMBER, project=f"a-{tag}")
    ident.add_member(session, f"ann-{tag}", f"b-{tag}", manager=True)
    ident.create_user(session, f"bo-{tag}", Role.MEMBER, project=f"a-{tag}")
    ident.create_user(session, f"vi-{tag}", Role.VIEWER, project=f"b-{tag}")
    ps = {name: ident.principal_for(session, f"{name}-{tag}") for name in ("ann", "bo", "vi")}
    ps["admin"] = ident.principal_for(session, "admin")
    a, b = ps["ann"].project_ids_by_name[f"a-{tag}"], ps["ann"].project_ids_by_name[f"b-{tag}"]
    jobs = {}
    for name, who, project in (("ann-a", "ann", a), ("ann-b", "ann", b), ("bo-a", "bo", a)):
        spec = parse_spec(SPEC)
        job, created = submit_job(session, spec, owner_id=ps[who].user_id, project_id=project)
        assert created
        jobs[name] = job.id
    return tag, ps, jobs


def test_scopes_select_the_jobs_each_may_see(session, people) -> None:
    _, ps, jobs = people
    seen = {
        who: {
            name
            for name, job_id in jobs.items()
            if session.scalar(select(Job.id).where(Job.id == job_id, access.job_scope(p))) is not None
        }
        for who, p in ps.items()
    }
    assert seen == {
        "ann": {"ann-a", "ann-b", "bo-a"},
        "bo": {"ann-a", "bo-a"},
        "vi": {"ann-b"},
        "admin": {"ann-a", "ann-b", "bo-a"},
    }
    for who, p in ps.items():  # the clause and the function agree
        for job_id in jobs.values():
            job = session.get(Job, job_id)
            visible = session.scalar(select(Job.id).where(Job.id == job_id, access.job_scope(p))) is not None
            assert visible == access.can_read(p, job.owner_id, job.project_id), who
    nobody = Principal(uuid.uuid4(), "nobody", Role.MEMBER)
    assert session.scalars(select(Job.id).where(access.job_scope(nobody))).all() == []


def test_submits_record_owner_and_project(session, people) -> None:
    tag, ps, jobs = people
    summary = job_summary(session, jobs["ann-b"])
    assert (summary["owner"], summary["project"]) == (f"ann-{tag}", f"b-{tag}")
    direct, _ = submit_job(session, parse_spec(SPEC))  # direct mode: the admin, in default
    summary = job_summary(session, direct.id)
    assert (summary["owner"], summary["project"]) == ("admin", "default")
    keyed = parse_spec({**SPEC, "idempotency_key": f"k-{tag}"})
    project_a = ps["ann"].project_ids_by_name[f"a-{tag}"]
    first, _ = submit_job(session, keyed, owner_id=ps["ann"].user_id, project_id=project_a)
    again, created = submit_job(session, keyed, owner_id=ps["ann"].user_id, project_id=first.project_id)
    assert (again.id, created) == (first.id, False)
    with pytest.raises(UserError, match="already in use; choose another") as refused:
        submit_job(session, keyed, owner_id=ps["bo"].user_id, project_id=first.project_id)
    assert str(first.id) not in str(refused.value)  # someone else's job is not named


def test_bulk_jobs_and_the_jobs_they_feed_belong_to_the_submitter(session, people) -> None:
    tag, ps, _ = people
    project = ps["bo"].project_ids_by_name[f"a-{tag}"]
    rows = read_manifest(b'{"id": "r1"}\n{"id": "r2", "steps": 3}\n', "m.jsonl")
    base = {**SPEC, "output_prefix": "acl-bulk"}
    bulk.submit_bulk(session, f"night-{tag}", base, rows, owner_id=ps["bo"].user_id, project_id=project)
    more = read_manifest(b'{"id": "r3", "steps": 4}\n', "m.jsonl")
    bulk.submit_bulk(session, f"night-{tag}", base, more)  # extended by someone else: still bo's
    made = session.scalar(select(BulkJob).where(BulkJob.name == f"night-{tag}"))
    assert (made.owner_id, made.project_id) == (ps["bo"].user_id, project)
    owners = session.execute(select(Job.owner_id, Job.project_id).where(Job.bulk_id == made.id)).all()
    assert len(owners) == 3 and set(owners) == {(ps["bo"].user_id, project)}
    assert session.scalar(select(BulkJob.id).where(BulkJob.id == made.id, access.bulk_scope(ps["vi"]))) is None
    assert session.scalar(select(BulkJob.id).where(BulkJob.id == made.id, access.bulk_scope(ps["ann"]))) == made.id
    default = bulk.submit_bulk(session, f"direct-{tag}", base, rows)
    direct = session.get(BulkJob, uuid.UUID(default["bulk_id"]))
    admin, default_project = ident.ensure_default_identity(session)
    assert (direct.owner_id, direct.project_id) == (admin.id, default_project.id)
