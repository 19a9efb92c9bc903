"""``GET /v1/jobs/{ref}/events``: a job's progress as server-sent events.

``progress`` events carry the job's summary (counts, no shards) whenever it changed since the
last one (looked at every ``api.events_poll_s``), a comment line keeps quiet connections open,
and ``end`` carries the final summary once the job has ended; then the stream closes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from farm.api.auth import caller
from farm.api.jobs import JobRef, job_of
from farm.api.state import ApiState, api_state
from farm.job_views import settled
from storage.access import job_scope
from storage.identity import Principal
from storage.status import JOB_TERMINAL, JobStatus

router = APIRouter(prefix="/v1", tags=["jobs"])
KEEPALIVE_S = 15.0


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, sort_keys=True, default=str)}\n\n"


def _ended(summary: dict[str, Any]) -> bool:
    """Ended and settled, as a client's ``wait`` sees it."""
    return JobStatus(summary["status"]) in JOB_TERMINAL and settled(summary)


async def job_events(state: ApiState, job_id: Any, scope: Any) -> AsyncIterator[str]:
    """The stream's lines (linked jobs outside ``scope``, the watcher's, show only their status).
    An async generator: a watcher who goes away, or the server shutting
    down, cancels it at its next wait (the database is read on a worker thread)."""
    last: str | None = None
    quiet_since = time.monotonic()
    while True:
        summary = await anyio.to_thread.run_sync(lambda: state.farm.get(job_id, shards=0, scope=scope))
        shown = json.dumps({k: v for k, v in summary.items() if k != "waiting"}, sort_keys=True, default=str)
        if _ended(summary):
            yield _event("end", summary)
            return
        if shown != last:
            last, quiet_since = shown, time.monotonic()
            yield _event("progress", summary)
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": still running\n\n"
        await anyio.sleep(state.settings.api.events_poll_s)


@router.get(
    "/jobs/{ref}/events",
    summary="The job's progress as server-sent events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def events(
    ref: JobRef, who: Annotated[Principal, Depends(caller)], state: Annotated[ApiState, Depends(api_state)]
) -> StreamingResponse:
    job_id, _ = job_of(state, who, ref)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(job_events(state, job_id, job_scope(who)), media_type="text/event-stream", headers=headers)
