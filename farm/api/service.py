"""The API's own routes: ``/healthz`` (can it reach its database?), ``/metrics`` (Prometheus
text: requests by route and status, jobs by status, and each work queue's demand, the
``farm_queue_*`` gauges an autoscaler follows: :mod:`farm.demand`), ``/v1/me``, ``/v1/workers``
and ``/v1/queues``.

The queue gauges are read from the database at each scrape (three small queries). When the
database cannot be read they are left out (with ``farm_api_database_up 0``) rather than shown as
zeros: an autoscaler then keeps its workers instead of scaling them away."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from farm.api.auth import caller
from farm.api.state import ApiState, api_state
from farm.demand import metric_lines, queue_demands
from farm.errors import Forbidden
from storage.audit import MAX_PAGE, list_audit
from storage.db import session_scope
from storage.identity import Principal
from storage.models import Job, Project

router = APIRouter()
Caller = Annotated[Principal, Depends(caller)]
State = Annotated[ApiState, Depends(api_state)]


@router.get("/healthz", tags=["service"], summary="Whether the API can reach its database")
def healthz(state: State) -> JSONResponse:
    try:
        with session_scope(state.sessions) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure: unhealthy, without the error's text (it may hold a URL)
        return JSONResponse({"status": "unavailable", "database": type(exc).__name__}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


@router.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=PlainTextResponse)
def metrics(state: State) -> PlainTextResponse:
    lines = [
        "# HELP farm_api_requests_total API requests by method, route and status.",
        "# TYPE farm_api_requests_total counter",
    ]
    counters = state.counters
    with counters.lock:
        counts, seconds = dict(counters.counts), dict(counters.seconds)
    for (method, route, status), n in sorted(counts.items()):
        lines.append(f'farm_api_requests_total{{method="{method}",route="{_label(route)}",status="{status}"}} {n}')
    lines += [
        "# HELP farm_api_request_seconds_total Time spent answering, by route.",
        "# TYPE farm_api_request_seconds_total counter",
    ]
    for (method, route), total in sorted(seconds.items()):
        lines.append(f'farm_api_request_seconds_total{{method="{method}",route="{_label(route)}"}} {total:.6f}')
    lines += ["# HELP farm_jobs Jobs by status.", "# TYPE farm_jobs gauge"]
    try:
        with session_scope(state.sessions) as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            demands = queue_demands(session, state.settings)
        for status, n in sorted(rows, key=lambda r: str(r[0])):
            lines.append(f'farm_jobs{{status="{_label(getattr(status, "value", status))}"}} {n}')
        lines += metric_lines(demands)
        lines.append("farm_api_database_up 1")
    except Exception:
        lines.append("farm_api_database_up 0")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


@router.get("/v1/me", tags=["identity"], summary="Who the token belongs to")
def me(who: Caller, state: State) -> dict[str, Any]:
    with session_scope(state.sessions) as session:
        names = dict(session.execute(select(Project.id, Project.name).where(Project.id.in_(list(who.projects)))).all())
    projects = [{"name": names.get(pid, str(pid)), "manager": manages} for pid, manages in who.projects.items()]
    return {
        "name": who.name,
        "role": str(getattr(who.role, "value", who.role)),
        "projects": sorted(projects, key=lambda p: p["name"]),
    }


@router.get("/v1/audit", tags=["identity"], summary="The audit log, newest first (admins)")
def audit_log(
    who: Caller,
    state: State,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[
        str | None, Query(max_length=64, description="e.g. job.cancel, or job.* for every job action")
    ] = None,
    target: Annotated[str | None, Query(max_length=256)] = None,
    before: Annotated[int | None, Query(ge=1, description="The id of the last row of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> list[dict[str, Any]]:
    if not who.is_admin:
        raise Forbidden("only admins may read the audit log")
    with session_scope(state.sessions) as session:
        return list_audit(session, actor=actor, action=action, target=target, before_id=before, limit=limit)


@router.get("/v1/workers", tags=["workers"], summary="Registered workers")
def workers(who: Caller, state: State) -> list[dict[str, Any]]:
    return state.farm.workers()


@router.get("/v1/queues", tags=["workers"], summary="Demand per work queue and the workers it wants")
def queues(who: Caller, state: State) -> list[dict[str, Any]]:
    return state.farm.queues()
