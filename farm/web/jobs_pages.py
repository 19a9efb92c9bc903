"""The jobs pages: ``/jobs`` (newest first, filters, a search box, pages, several jobs cancelled
or retried at once) and ``/jobs/{ref}`` (the spec, the shard grid that follows the job live, the
finished items, the contact sheet and manifest, and cancel / retry / priority for those allowed,
re-run or re-run failed for those who may submit into the job's project).

The pages call the same route functions the API serves (:mod:`farm.api.jobs`): the same scope
(another project's job is a 404 page), the same :mod:`storage.access` decisions, the same audit.
"""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import quote, urlencode

import yaml
from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from farm.api import jobs as api_jobs
from farm.api.jobs import JobRef, PriorityChange, RerunRequest, job_of
from farm.api.state import ApiState, api_state
from farm.errors import FarmError, UserError
from farm.web.render import PageRoute, page
from farm.web.sessions import form_caller, page_caller
from storage.access import can_change, can_rerun, job_scope
from storage.db import session_scope
from storage.identity import Principal
from storage.models import Job
from storage.status import JOB_TERMINAL, JobStatus, ShardStatus

router = APIRouter(route_class=PageRoute, include_in_schema=False)
State = Annotated[ApiState, Depends(api_state)]
Viewer = Annotated[Principal, Depends(page_caller)]
Editor = Annotated[Principal, Depends(form_caller)]
PAGE_SIZE = 25
THUMBNAILS = 48
ACTIONS = {"cancel": api_jobs.cancel, "retry": api_jobs.retry}


def object_link(state: ApiState, job_id: uuid.UUID, key: str) -> str:
    """A browser's link to one of the job's objects: presigned for S3, else through the API
    (the session cookie is enough to read)."""
    if getattr(state.store, "bucket", None) is not None:
        return state.store.url(key)
    return f"/v1/jobs/{job_id}/objects/{quote(key, safe='/')}"


@router.get("/jobs")
def jobs_list(
    request: Request,
    who: Viewer,
    state: State,
    status: Annotated[str, Query(max_length=16)] = "",
    kind: Annotated[str, Query(max_length=64)] = "",
    owner: Annotated[str, Query(max_length=64)] = "",
    project: Annotated[str, Query(max_length=64)] = "",
    q: Annotated[str, Query(max_length=128)] = "",
    cursor: Annotated[str, Query(max_length=100)] = "",
    done: Annotated[str, Query(max_length=16)] = "",
    ok: Annotated[int, Query(ge=0, le=1000)] = 0,
    refused: Annotated[int, Query(ge=0, le=1000)] = 0,
) -> Response:
    statuses = [JobStatus(status)] if status in {s.value for s in JobStatus} else None
    listed = api_jobs.list_jobs(
        who,
        state,
        status=statuses,
        kind=kind.strip() or None,
        owner=owner.strip() or None,
        project=project.strip() or None,
        q=q.strip() or None,
        limit=PAGE_SIZE,
        cursor=cursor or None,
    )
    ids = [uuid.UUID(j["id"]) for j in listed.jobs]
    with session_scope(state.sessions) as session:
        names = {str(i): p for i, p in session.execute(select(Job.id, Job.output_prefix).where(Job.id.in_(ids)))}
    jobs = [{**j, "name": names.get(j["id"], "")} for j in listed.jobs]
    filters = {"status": status, "kind": kind, "owner": owner, "project": project, "q": q}
    kept = {k: v for k, v in filters.items() if v}
    next_page = f"/jobs?{urlencode({**kept, 'cursor': listed.next_cursor})}" if listed.next_cursor else None
    return page(
        request,
        "jobs.html",
        jobs=jobs,
        filters=filters,
        statuses=[s.value for s in JobStatus],
        projects=sorted(who.project_ids_by_name),
        next_page=next_page,
        first_page=f"/jobs?{urlencode(kept)}" if cursor else None,
        done=done if done in ACTIONS else "",
        ok=ok,
        refused=refused,
    )


@router.post("/jobs/actions")
def jobs_action(
    request: Request,
    who: Editor,
    state: State,
    action: Annotated[str, Form(max_length=16)] = "",
    job: Annotated[list[str], Form(max_length=64)] = [],  # noqa: B006 (FastAPI copies form defaults)
) -> Response:
    """Cancel or retry every job ticked on the jobs page; each is checked and audited alone."""
    call = ACTIONS.get(action)
    if call is None:
        raise UserError("choose cancel or retry")
    ok = refused = 0
    for ref in job[: PAGE_SIZE * 4]:
        try:
            call(ref, request, who, state)
            ok += 1
        except FarmError:
            refused += 1
    query = urlencode({"done": action, "ok": ok, "refused": refused})
    return RedirectResponse(f"/jobs?{query}", status_code=303)


@router.get("/jobs/{ref}")
def job_page(
    request: Request,
    ref: JobRef,
    who: Viewer,
    state: State,
) -> Response:
    job_id, row = job_of(state, who, ref)
    summary = state.farm.get(job_id, shards="all", scope=job_scope(who))
    with session_scope(state.sessions) as session:
        spec = session.scalar(select(Job.spec).where(Job.id == job_id)) or {}
    results = state.farm.results(job_id, url=lambda key: object_link(state, job_id, key))
    previews = state.farm.previews(job_id, url=lambda key: object_link(state, job_id, key))
    running = summary["shards_by_status"].get(ShardStatus.RUNNING.value, 0)
    ended = JobStatus(summary["status"]) in JOB_TERMINAL and not (summary["status"] == "cancelled" and running)
    return page(
        request,
        "job.html",
        job=summary,
        spec_yaml=yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100),
        shards=summary["shards"],
        shard_states=[s.value for s in ShardStatus],
        results=results[:THUMBNAILS],
        more_results=max(0, len(results) - THUMBNAILS),
        previews=previews,
        may_change=can_change(who, row.owner_id, row.project_id),
        may_rerun=can_rerun(who, row.project_id),
        ended=ended,
        max_priority=9 if who.is_admin else state.settings.api.member_max_priority,
    )


@router.post("/jobs/{ref}/cancel")
def job_cancel(request: Request, ref: JobRef, who: Editor, state: State) -> Response:
    api_jobs.cancel(ref, request, who, state)
    return RedirectResponse(f"/jobs/{quote(ref, safe='')}", status_code=303)


@router.post("/jobs/{ref}/retry")
def job_retry(request: Request, ref: JobRef, who: Editor, state: State) -> Response:
    api_jobs.retry(ref, request, who, state)
    return RedirectResponse(f"/jobs/{quote(ref, safe='')}", status_code=303)


@router.post("/jobs/{ref}/rerun")
def job_rerun(
    request: Request,
    ref: JobRef,
    who: Editor,
    state: State,
    only_failed: Annotated[bool, Form()] = False,
) -> Response:
    """A new job from this one's spec (only its failed items when asked); opens the new job."""
    done = api_jobs.rerun(ref, RerunRequest(only_failed=only_failed), request, Response(), who, state)
    if not isinstance(done, api_jobs.Rerun):  # the rate limit's answer
        raise UserError("too many submissions: wait a minute and try again")
    return RedirectResponse(f"/jobs/{done.job_id}", status_code=303)


@router.post("/jobs/{ref}/priority")
def job_priority(
    request: Request,
    who: Editor,
    state: State,
    ref: Annotated[str, Path(min_length=1, max_length=64)],
    priority: Annotated[int, Form(ge=0, le=9)] = 0,
) -> Response:
    api_jobs.change(ref, PriorityChange(priority=priority), request, who, state)
    return RedirectResponse(f"/jobs/{quote(ref, safe='')}", status_code=303)
