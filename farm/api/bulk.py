"""``/v1/bulk``: bulk dataset renders through the API: submit (the manifest travels in the
request: JSONL or CSV text), status, retry of failed rows, export of the dataset (JSONL).

A bulk job belongs to whoever created it, in a project; the jobs it feeds are its owner's. Extending
someone else's bulk job (submitting rows under its name) needs the right to change it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from farm.api.auth import caller
from farm.api.jobs import audited, check_inputs_sent, rate_limited
from farm.api.state import ApiState, api_state
from farm.bulk import ManifestUpload, bulk_status, export_rows, retry_failed_rows
from farm.errors import Forbidden, NotFound
from storage.access import bulk_scope, can_change, submit_project
from storage.db import session_scope
from storage.identity import Principal
from storage.models import BulkJob

router = APIRouter(prefix="/v1", tags=["bulk"])
Caller = Annotated[Principal, Depends(caller)]
State = Annotated[ApiState, Depends(api_state)]
BulkName = Annotated[str, Path(min_length=1, max_length=128)]


class BulkSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="The bulk job's name (its idempotency key).")
    base: dict[str, Any] = Field(description="The base job spec the rows apply to; inputs already uploaded.")
    manifest: str = Field(description="The manifest's text: JSONL (one row per line) or CSV.")
    format: Literal["jsonl", "csv"] = "jsonl"
    project: str | None = Field(default=None, max_length=64)
    feed_until: datetime | None = Field(default=None, description="Feeding stops at this time.")


def _bulk_row(state: ApiState, who: Principal, name: str) -> Any:
    """The bulk job ``name`` among the caller's (404 otherwise), with owner and project ids."""
    with session_scope(state.sessions) as session:
        row = session.execute(
            select(BulkJob.owner_id, BulkJob.project_id).where(BulkJob.name == name, bulk_scope(who))
        ).one_or_none()
    if row is None:
        raise NotFound(f"no bulk job named {name!r}")
    return row


@router.post("/bulk", summary="Create or extend a bulk job", responses={429: {"description": "Too many submissions"}})
def submit(body: BulkSubmit, request: Request, who: Caller, state: State) -> Any:
    refused = rate_limited(state, request, who, "bulk.submit", body.name)
    if refused is not None:
        return refused
    with audited(state, request, who, "bulk.submit", body.name):
        check_inputs_sent(state, body.base, "base")
        project_id = submit_project(who, body.project)
        with session_scope(state.sessions) as session:
            existing = session.execute(
                select(BulkJob.owner_id, BulkJob.project_id).where(BulkJob.name == body.name)
            ).one_or_none()
        if existing is not None and not can_change(who, existing.owner_id, existing.project_id):
            raise Forbidden(f"bulk job {body.name!r} is not yours to extend; choose another name")
        manifest = ManifestUpload(body.manifest.encode(), f"manifest.{body.format}")
        return state.farm.submit_bulk(
            body.name, body.base, manifest, feed_until=body.feed_until, owner_id=who.user_id, project_id=project_id
        )


@router.get("/bulk/{name}", summary="A bulk job's progress per model family")
def status(name: BulkName, who: Caller, state: State) -> dict[str, Any]:
    _bulk_row(state, who, name)
    with session_scope(state.sessions) as session:
        return bulk_status(session, name)


@router.post("/bulk/{name}/retry", summary="Feed a bulk job's failed rows again")
def retry(name: BulkName, request: Request, who: Caller, state: State) -> dict[str, Any]:
    with audited(state, request, who, "bulk.retry", name):
        row = _bulk_row(state, who, name)
        if not can_change(who, row.owner_id, row.project_id):
            raise Forbidden(f"you may not retry bulk job {name!r}: it is not yours and you do not manage its project")
        with session_scope(state.sessions) as session:
            count = retry_failed_rows(session, name)
        state.farm.feed_bulk()
        return {"name": name, "requeued": count}


@router.get(
    "/bulk/{name}/export",
    summary="The bulk job's dataset, one JSON record per line",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/jsonl": {}}}},
)
def export(name: BulkName, who: Caller, state: State) -> StreamingResponse:
    _bulk_row(state, who, name)

    def lines() -> Iterator[str]:
        with session_scope(state.sessions) as session:
            for record in export_rows(session, name):
                yield json.dumps(record, sort_keys=True) + "\n"

    return StreamingResponse(lines(), media_type="application/jsonl")
