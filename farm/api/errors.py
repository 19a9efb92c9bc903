"""Errors as JSON: ``{"error": {"type", "message", "problems": [{"field", "reason"}]}}``.

The message is the one the CLI prints for the same mistake (the exception's own text); a refused
spec lists each field path with its reason. Nothing else of the request is echoed back.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from farm.errors import (
    FarmError,
    Forbidden,
    InvalidTransition,
    JobNotScheduled,
    NotFound,
    ObjectNotFound,
    Unauthorized,
    UserError,
)
from farm.job_spec import SpecError

MAX_PROBLEMS = 50
MAX_INPUT_SHOWN = 80


def error_body(kind: str, message: str, problems: list[tuple[str, str]] | None = None, **extra: Any) -> dict:
    body: dict[str, Any] = {"type": kind, "message": message}
    if problems:
        body["problems"] = [{"field": field, "reason": reason} for field, reason in problems[:MAX_PROBLEMS]]
    body.update(extra)
    return {"error": body}


def status_of(exc: FarmError) -> int:
    """The HTTP status a farm error answers with."""
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, NotFound | ObjectNotFound):
        return 404
    if isinstance(exc, InvalidTransition):
        return 409
    if isinstance(exc, UserError):
        return 422
    return 503 if exc.retryable else 500


def farm_error_response(exc: FarmError) -> JSONResponse:
    status = status_of(exc)
    problems = exc.problems if isinstance(exc, SpecError) else None
    extra: dict[str, Any] = {}
    if isinstance(exc, JobNotScheduled):
        extra["job_id"] = str(exc.job_id)
    message = str(exc) if status < 500 or exc.retryable else "internal error"
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(type(exc).__name__, message, problems, **extra), status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    """A request validation location as a field path: ``body.spec.steps``, ``query.limit``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the JSON shape above."""

    @app.exception_handler(FarmError)
    async def _farm(_request: Request, exc: FarmError) -> JSONResponse:
        return farm_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [(_field(tuple(e.get("loc", ()))), str(e.get("msg", "invalid"))) for e in exc.errors()]
        message = "invalid request: " + "; ".join(f"{f}: {r}" for f, r in problems[:5])
        return JSONResponse(error_body("RequestError", message, problems), 422)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return JSONResponse(error_body("HTTPError", detail), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse(error_body("InternalError", "internal error"), 500)
