"""``PUT /v1/inputs/{sha256}``: an input image (identity reference, conditioning frame) sent
before the spec that names it. Checked exactly as the client checks a local file (size, an image
of a known format within the pixel limit, its sha256) before anything is stored; stored
content-addressed, so sending the same image twice stores it once."""

from __future__ import annotations

import re
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path, Request

from farm.api.auth import caller
from farm.api.jobs import audited
from farm.api.state import ApiState, api_state
from farm.errors import Forbidden, UserError
from farm.inputs import MAX_INPUT_BYTES, store_input
from storage.identity import Principal
from storage.status import Role

router = APIRouter(prefix="/v1", tags=["inputs"])
SHA256 = re.compile(r"[0-9a-f]{64}")
ACCEPTED = {"image/png", "image/jpeg", "image/webp", "application/octet-stream"}


@router.put(
    "/inputs/{sha256}",
    status_code=201,
    summary="Upload an input image (the request body is the file)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(ACCEPTED)},
        }
    },
)
async def put_input(
    sha256: Annotated[str, Path(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")],
    request: Request,
    who: Annotated[Principal, Depends(caller)],
    state: Annotated[ApiState, Depends(api_state)],
) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_INPUT_BYTES:
        raise UserError(f"input: larger than {MAX_INPUT_BYTES >> 20} MiB")
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > MAX_INPUT_BYTES:
            raise UserError(f"input: larger than {MAX_INPUT_BYTES >> 20} MiB")
    return await anyio.to_thread.run_sync(lambda: _keep(state, request, who, sha256, content_type, bytes(data)))


def _keep(state: ApiState, request: Request, who: Principal, sha256: str, content_type: str, data: bytes) -> dict:
    """Check and store the bytes (on a worker thread: image checks and store writes block)."""
    with audited(state, request, who, "input.upload", sha256) as note:
        if who.role == Role.VIEWER:
            raise Forbidden("viewers may not upload inputs")
        if content_type not in ACCEPTED:
            raise UserError(
                f"input: content type {content_type[:60]!r} is not an accepted image type (png, jpeg, webp)"
            )
        ref = store_input(state.store, data, "input", sha256=sha256)
        note.update(target=ref["key"], status=201)
    return ref
