"""``/v1/jobs``: submit, list, look at, cancel, retry, re-run, re-prioritize a job; its results.

Every job a caller may not see answers exactly as a job that does not exist (404), by id or by
prefix: nobody learns another project's jobs by guessing. Who may change what is decided by
:mod:`storage.access`; every state-changing call is audited, refused ones included.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import String, and_, cast, func, or_, select

from farm.api.auth import audit, caller
from farm.api.errors import error_body, status_of
from farm.api.state import ApiState, api_state
from farm.errors import FarmError, Forbidden, NotFound, UserError
from farm.inputs import local_paths, missing_inputs
from farm.job_refs import resolve_job_id
from farm.job_spec import SpecError
from farm.reruns import plan_rerun
from farm.scheduler import job_summary
from farm.spec_overrides import MAX_OVERRIDES
from farm.specs import JobSpec, parse_spec
from storage.access import (
    can_change,
    check_class_change,
    check_priority,
    check_rerun,
    job_scope,
    submit_project,
)
from storage.audit import submit_wait
from storage.db import session_scope
from storage.identity import Principal
from storage.models import Artifact, Job, Project, User
from storage.objects.keys import contact_sheet_key, manifest_key
from storage.status import JobStatus, ServiceClass

router = APIRouter(prefix="/v1", tags=["jobs"])
JobRef = Annotated[str, Path(min_length=1, max_length=64, description="A job id or a unique prefix of it.")]
Caller = Annotated[Principal, Depends(caller)]
State = Annotated[ApiState, Depends(api_state)]
MAX_LIST = 200


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(description="The job spec, as in a spec file; inputs already uploaded.")
    project: str | None = Field(default=None, max_length=64, description="Default: your only project.")


class Submitted(BaseModel):
    job_id: str
    created: bool = Field(description="False: the spec's idempotency_key had already submitted this job.")
    status: str


class SpecCheck(BaseModel):
    ok: bool
    kind: str


class PriorityChange(BaseModel):
    """A change of a job's priority and/or its service class (the class: admins only)."""

    model_config = ConfigDict(extra="forbid")

    priority: int | None = Field(default=None, ge=0, le=9)
    service_class: ServiceClass | None = Field(
        default=None, description="interactive (goes first) or bulk; only an admin may change it."
    )


class RerunRequest(BaseModel):
    """A new job from a job's stored spec."""

    model_config = ConfigDict(extra="forbid")

    only_failed: bool = Field(default=False, description="Only the items the job did not render.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_OVERRIDES,
        description='Changes to the spec: dotted path -> value, e.g. {"steps": 30, "prompts.0": "a cat"}.',
    )


class Rerun(BaseModel):
    job_id: str
    parent_job_id: str
    created: bool
    status: str
    items_total: int
    only_failed: bool


class JobPage(BaseModel):
    jobs: list[dict[str, Any]]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


@contextmanager
def audited(
    state: ApiState, request: Request, who: Principal, action: str, target: str | None = None
) -> Iterator[dict]:
    """Audit one state-changing call with its outcome; the block may set ``note["status"]``,
    ``note["target"]`` and ``note["detail"]``."""
    note: dict[str, Any] = {"status": 200, "target": target, "detail": None}
    try:
        yield note
    except FarmError as exc:
        audit(
            state,
            request,
            who,
            action,
            target=note["target"],
            status=status_of(exc),
            detail={"error": type(exc).__name__},
        )
        raise
    except Exception as exc:  # a fault of ours: still on record, as the 500 it answers with
        audit(state, request, who, action, target=note["target"], status=500, detail={"error": type(exc).__name__})
        raise
    audit(state, request, who, action, target=note["target"], status=note["status"], detail=note["detail"])


def rate_limited(
    state: ApiState, request: Request, who: Principal, action: str, target: str | None = None
) -> JSONResponse | None:
    """The 429 answer (audited) when the caller's token is past ``api.submit_per_minute``;
    ``None`` when the submission may go on. The count is the audit log's (every API process
    sees the same one): the submission's own audit row counts it."""
    with session_scope(state.sessions) as session:
        wait = submit_wait(session, who.token_id, who.user_id, state.settings.api.submit_per_minute)
    if wait is None:
        return None
    audit(state, request, who, action, target=target, status=429)
    message = f"too many submissions: at most {state.settings.api.submit_per_minute} a minute per token"
    return JSONResponse(error_body("RateLimited", message), 429, headers={"Retry-After": f"{wait:.0f}"})


def refuse_local_paths(raw: Any, label: str = "spec") -> None:
    """A path on the caller's machine is refused: only a client can upload it."""
    paths = local_paths(raw, label)
    if paths:
        reason = "a file on your machine: upload it first (the farm client does; PUT /v1/inputs)"
        raise SpecError([(path, reason) for path in paths])


def check_inputs_sent(state: ApiState, raw: Any, label: str = "spec") -> None:
    """No local path, and every input ``raw`` names already in the store."""
    refuse_local_paths(raw, label)
    missing = missing_inputs(state.store, raw, label)
    if missing:
        raise SpecError(missing)


def parsed_spec(raw: dict[str, Any]) -> JobSpec:
    """The spec parsed as the CLI parses it, local paths refused."""
    refuse_local_paths(raw)
    return parse_spec(raw)


def checked_spec(state: ApiState, raw: dict[str, Any]) -> JobSpec:
    """:func:`parsed_spec`, its model checked as the CLI checks it and every input it names
    already in the store."""
    spec = state.farm.with_local_model(parsed_spec(raw))
    check_inputs_sent(state, raw)
    return spec


def job_of(state: ApiState, who: Principal, ref: str) -> tuple[uuid.UUID, Any]:
    """The job ``ref`` names among the caller's, with its owner and project ids."""
    with session_scope(state.sessions) as session:
        job_id = resolve_job_id(session, ref, scope=job_scope(who))
        row = session.execute(select(Job.owner_id, Job.project_id).where(Job.id == job_id)).one()
    return job_id, row


def _changeable(state: ApiState, who: Principal, ref: str, what: str) -> uuid.UUID:
    job_id, row = job_of(state, who, ref)
    if not can_change(who, row.owner_id, row.project_id):
        raise Forbidden(f"you may not {what} job {job_id}: it is not yours and you do not manage its project")
    return job_id


@router.post("/specs/check", response_model=SpecCheck, summary="Check a spec without submitting it")
def check_spec(body: SubmitRequest, who: Caller, state: State) -> SpecCheck:
    spec = state.farm.with_local_model(parsed_spec(body.spec))
    check_priority(who, spec.priority, state.settings.api.member_max_priority)
    submit_project(who, body.project)
    return SpecCheck(ok=True, kind=spec.kind)


@router.post(
    "/jobs",
    response_model=Submitted,
    status_code=201,
    summary="Submit a job",
    responses={429: {"description": "Too many submissions from this token"}},
)
def submit(body: SubmitRequest, request: Request, response: Response, who: Caller, state: State) -> Any:
    refused = rate_limited(state, request, who, "job.submit")
    if refused is not None:
        return refused
    with audited(state, request, who, "job.submit") as note:
        spec = checked_spec(state, body.spec)
        check_priority(who, spec.priority, state.settings.api.member_max_priority)
        project_id = submit_project(who, body.project)
        done = state.farm.submit_parsed(spec, owner_id=who.user_id, project_id=project_id, scope=job_scope(who))
        note.update(target=str(done.job_id), status=201 if done.created else 200)
    response.status_code = 201 if done.created else 200
    return Submitted(job_id=str(done.job_id), created=done.created, status=done.status)


def _cursor(value: str | None) -> tuple[datetime, uuid.UUID] | None:
    if not value:
        return None
    try:
        stamp, _, ident = value.partition("_")
        return datetime.fromisoformat(stamp), uuid.UUID(ident)
    except ValueError:
        raise UserError("cursor: not a cursor this API gave (use next_cursor as it is)") from None


@router.get("/jobs", response_model=JobPage, summary="List jobs")
def list_jobs(
    who: Caller,
    state: State,
    status: Annotated[list[JobStatus] | None, Query(description="Only jobs in these statuses.")] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    owner: Annotated[str | None, Query(max_length=64, description="A user name.")] = None,
    project: Annotated[str | None, Query(max_length=64, description="A project name.")] = None,
    q: Annotated[str | None, Query(max_length=128, description="Start of the job id or of its output prefix.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> JobPage:
    after = _cursor(cursor)
    query = select(Job.id, Job.created_at).where(job_scope(who))
    if status:
        query = query.where(Job.status.in_(status))
    if kind:
        query = query.where(Job.kind == kind)
    if owner:
        query = query.where(Job.owner_id == select(User.id).where(User.name == owner).scalar_subquery())
    if project:
        query = query.where(Job.project_id == select(Project.id).where(Project.name == project).scalar_subquery())
    if q:
        text = q.strip().lower()
        hex_id = func.lower(func.replace(cast(Job.id, String), "-", ""))
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(
            or_(
                hex_id.like(escaped.replace("-", "") + "%", escape="\\"),
                Job.output_prefix.like(escaped + "%", escape="\\"),
            )
        )
    if after is not None:
        stamp, ident = after
        query = query.where(or_(Job.created_at < stamp, and_(Job.created_at == stamp, Job.id < ident)))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with session_scope(state.sessions) as session:
        rows = session.execute(query).all()
        jobs = [job_summary(session, row.id, shard_limit=0) for row in rows[:limit]]
    more = len(rows) > limit
    last = rows[limit - 1] if more else None
    return JobPage(jobs=jobs, next_cursor=f"{last.created_at.isoformat()}_{last.id}" if last else None)


@router.get("/jobs/{ref}", summary="A job with its shards")
def get_job(
    ref: JobRef,
    who: Caller,
    state: State,
    shards: Annotated[str, Query(max_length=8, description="How many shards to list, or 'all'.")] = "20",
) -> dict[str, Any]:
    job_id, _ = job_of(state, who, ref)
    return state.farm.get(job_id, shards=shards, scope=job_scope(who))


@router.post("/jobs/{ref}/cancel", summary="Cancel a job")
def cancel(ref: JobRef, request: Request, who: Caller, state: State) -> dict[str, Any]:
    with audited(state, request, who, "job.cancel", ref) as note:
        job_id = _changeable(state, who, ref, "cancel")
        note["target"] = str(job_id)
        return state.farm.cancel(job_id)


@router.post("/jobs/{ref}/retry", summary="Re-queue a job's failed shards and re-send its stuck ones")
def retry(ref: JobRef, request: Request, who: Caller, state: State) -> dict[str, Any]:
    with audited(state, request, who, "job.retry", ref) as note:
        job_id = _changeable(state, who, ref, "retry")
        note["target"] = str(job_id)
        return state.farm.retry(job_id)


@router.post(
    "/jobs/{ref}/rerun",
    response_model=Rerun,
    status_code=201,
    summary="Submit a new job from a job's spec: with overrides, or only its failed items",
    responses={429: {"description": "Too many submissions from this token"}},
)
def rerun(ref: JobRef, body: RerunRequest, request: Request, response: Response, who: Caller, state: State) -> Any:
    refused = rate_limited(state, request, who, "job.rerun", ref)
    if refused is not None:
        return refused
    with audited(state, request, who, "job.rerun", ref) as note:
        job_id, row = job_of(state, who, ref)
        note["target"] = str(job_id)
        check_rerun(who, row.project_id)
        with session_scope(state.sessions) as session:
            plan = plan_rerun(session, job_id, only_failed=body.only_failed, overrides=body.overrides)
        spec = plan.check(checked_spec(state, plan.raw))
        check_priority(who, spec.priority, state.settings.api.member_max_priority)
        done = state.farm.submit_rerun(plan, spec, owner_id=who.user_id, project_id=row.project_id)
        note.update(target=done["job_id"], detail={"parent": str(job_id), "only_failed": body.only_failed})
        note["status"] = 201 if done["created"] else 200
    response.status_code = note["status"]
    return Rerun(**done)


@router.patch("/jobs/{ref}", summary="Change a job's priority or service class")
def change(ref: JobRef, body: PriorityChange, request: Request, who: Caller, state: State) -> dict[str, Any]:
    action = "job.priority" if body.service_class is None else "job.class"
    with audited(state, request, who, action, ref) as note:
        job_id = _changeable(state, who, ref, "re-prioritize")
        note.update(target=str(job_id), detail=body.model_dump(mode="json", exclude_none=True))
        if body.priority is None and body.service_class is None:
            raise SpecError([("priority", "give priority and/or service_class")])
        if body.priority is not None:
            check_priority(who, body.priority, state.settings.api.member_max_priority)
        if body.service_class is not None:
            check_class_change(who)
        if body.priority is not None:
            summary = state.farm.set_priority(job_id, body.priority)
        if body.service_class is not None:
            summary = state.farm.set_class(job_id, body.service_class.value)
        return summary


def object_url(state: ApiState, request: Request, job_id: uuid.UUID) -> Any:
    """How a key of the job becomes a URL: presigned for S3; through this API for a local store."""
    if getattr(state.store, "bucket", None) is not None:
        return state.store.url
    base = f"{state.public_url(request)}/v1/jobs/{job_id}/objects/"
    return lambda key: base + key


@router.get("/jobs/{ref}/results", summary="The job's outputs with download URLs")
def results(ref: JobRef, request: Request, who: Caller, state: State) -> list[dict[str, Any]]:
    job_id, _ = job_of(state, who, ref)
    return state.farm.results(job_id, url=object_url(state, request, job_id))


@router.get("/jobs/{ref}/previews", summary="The contact sheet, manifest and GIF previews")
def previews(ref: JobRef, request: Request, who: Caller, state: State) -> dict[str, Any]:
    job_id, _ = job_of(state, who, ref)
    return state.farm.previews(job_id, url=object_url(state, request, job_id))


@router.get(
    "/jobs/{ref}/objects/{key:path}",
    summary="Download one of the job's objects",
    responses={200: {"content": {"application/octet-stream": {}}}, 307: {"description": "Presigned S3 URL"}},
    response_class=Response,
)
def get_object(ref: JobRef, key: Annotated[str, Path(max_length=1024)], who: Caller, state: State) -> Response:
    job_id, _ = job_of(state, who, ref)
    with session_scope(state.sessions) as session:
        content_type = session.scalar(
            select(Artifact.content_type).where(Artifact.job_id == job_id, Artifact.key == key)
        )
        prefix = session.scalar(select(Job.output_prefix).where(Job.id == job_id))
    extra = {contact_sheet_key(prefix, job_id): "image/png", manifest_key(prefix, job_id): "application/json"}
    if content_type is None and key not in extra:
        raise NotFound(f"job {job_id} has no object {key[:200]!r}")
    if getattr(state.store, "bucket", None) is not None:
        return RedirectResponse(state.store.url(key), status_code=307)
    data = state.store.get_bytes(key)
    return Response(data, media_type=content_type or extra[key])
