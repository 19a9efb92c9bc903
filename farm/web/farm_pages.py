"""The farm's own pages: ``/workers`` (online or lost, queues, device and GPU memory, pinned
models, the shard each one renders, last heartbeat, the jobs it is blocked from) and ``/bulk``
(each bulk run's rows done / failed / remaining per family, its window, its next night, and a
retry of failed rows for those allowed).

Workers are the farm's, seen by every signed-in person, but a job of another project is never
named: a worker rendering one shows only that it is busy."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from farm.api import bulk as api_bulk
from farm.api.state import ApiState, api_state
from farm.beat import next_at
from farm.bulk import bulk_status
from farm.web.render import PageRoute, page
from farm.web.sessions import form_caller, page_caller
from storage.access import bulk_scope, can_change, job_scope
from storage.db import session_scope
from storage.identity import Principal
from storage.models import BulkJob, Job, JobWorker, Project, User

router = APIRouter(route_class=PageRoute, include_in_schema=False)
State = Annotated[ApiState, Depends(api_state)]
Viewer = Annotated[Principal, Depends(page_caller)]
Editor = Annotated[Principal, Depends(form_caller)]
MAX_BULK = 100


@router.get("/workers")
def workers_page(request: Request, who: Viewer, state: State) -> Response:
    workers = state.farm.workers()
    with session_scope(state.sessions) as session:
        busy = [uuid.UUID(w["current_shard"]["job_id"]) for w in workers if w["current_shard"]]
        visible = set(session.scalars(select(Job.id).where(job_scope(who), Job.id.in_(busy)))) if busy else set()
        blocked: dict[str, list[dict[str, Any]]] = {}
        rows = session.execute(
            select(JobWorker.worker, JobWorker.job_id, JobWorker.failures_in_a_row, JobWorker.last_error)
            .join(Job, Job.id == JobWorker.job_id)
            .where(JobWorker.blocked_at.is_not(None), job_scope(who))
            .order_by(JobWorker.blocked_at.desc())
        ).all()
    for row in rows:
        blocked.setdefault(row.worker, []).append(
            {"job_id": str(row.job_id), "failures": row.failures_in_a_row, "error": row.last_error}
        )
    shown_ids = {str(job_id) for job_id in visible}
    for worker in workers:
        shard = worker["current_shard"]
        worker["shard_visible"] = shard is not None and shard["job_id"] in shown_ids
        worker["blocked"] = blocked.get(worker["name"], [])
    return page(request, "workers.html", workers=workers)


def _next_nights(state: ApiState) -> dict[str, str]:
    now = datetime.now(UTC)
    nights = {}
    for schedule in state.settings.bulk.schedules:
        try:
            nights[schedule.name] = next_at(now, schedule.at, schedule.timezone).isoformat(timespec="minutes")
        except (ValueError, KeyError, ZoneInfoNotFoundError):  # an unknown zone: `farm beat` refuses it
            nights[schedule.name] = "-"
    return nights


@router.get("/bulk")
def bulk_page(request: Request, who: Viewer, state: State) -> Response:
    nights = _next_nights(state)
    runs = []
    with session_scope(state.sessions) as session:
        rows = session.execute(
            select(BulkJob.name, BulkJob.owner_id, BulkJob.project_id, BulkJob.created_at, User.name, Project.name)
            .join(User, User.id == BulkJob.owner_id)
            .join(Project, Project.id == BulkJob.project_id)
            .where(bulk_scope(who))
            .order_by(BulkJob.created_at.desc())
            .limit(MAX_BULK)
        ).all()
        for name, owner_id, project_id, created_at, owner, project in rows:
            runs.append(
                {
                    **bulk_status(session, name),
                    "owner": owner,
                    "project": project,
                    "created_at": created_at.isoformat(),
                    "next_night": nights.get(name),
                    "may_change": can_change(who, owner_id, project_id),
                }
            )
    return page(request, "bulk.html", runs=runs, window=state.settings.scheduling.window_per_queue)


@router.post("/bulk/{name}/retry")
def bulk_retry(
    request: Request, who: Editor, state: State, name: Annotated[str, Path(min_length=1, max_length=128)]
) -> Response:
    api_bulk.retry(name, request, who, state)
    return RedirectResponse("/bulk", status_code=303)
