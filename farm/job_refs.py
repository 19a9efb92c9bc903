"""Naming a job the way people do: the whole id, or the first characters of it that the CLI prints.

:func:`resolve_job_id` turns a reference into the job's UUID: a whole UUID (with or without
dashes) is taken as it is; a shorter run of hex digits (at least :data:`MIN_PREFIX`) must be the
start of exactly one job's id. An ambiguous prefix names the jobs it matches; an unknown one says
so (:class:`~farm.errors.NotFound`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session

from farm.errors import NotFound, UserError
from storage.models import Job

MIN_PREFIX = 4
SHOWN_PREFIX = 8  # what tables and messages print
_HEX = re.compile(r"[0-9a-f]+")


def short_id(job_id: object) -> str:
    """The first characters of a job id, as the CLI shows it (unique in practice; commands accept it)."""
    return str(job_id)[:SHOWN_PREFIX]


def resolve_job_id(session: Session, ref: str | uuid.UUID, scope: Any = None) -> uuid.UUID:
    """The id of the one job ``ref`` names (a UUID, or a unique prefix of one). ``scope``: a
    condition on :class:`Job` limiting the jobs that can be named (the API gives the caller's);
    a job outside it is answered exactly as one that does not exist."""
    text = str(ref).strip().lower()
    try:
        whole = ref if isinstance(ref, uuid.UUID) else uuid.UUID(text)
    except ValueError:
        whole = None
    if whole is not None:
        if scope is not None and session.scalar(select(Job.id).where(Job.id == whole, scope)) is None:
            raise NotFound(f"no job {whole}")
        return whole
    digits = text.replace("-", "")
    if len(digits) < MIN_PREFIX or _HEX.fullmatch(digits) is None:
        raise UserError(
            f"job id {str(ref)[:80]!r}: give the whole id or at least its first {MIN_PREFIX} hex digits "
            f"(as `farm status` prints them)"
        )
    hex_id = func.replace(cast(Job.id, String), "-", "")
    query = select(Job.id).where(func.lower(hex_id).like(f"{digits}%"))
    matches = session.scalars((query if scope is None else query.where(scope)).limit(6)).all()
    if not matches:
        raise NotFound(f"no job id starts with {text!r}")
    if len(matches) > 1:
        shown = ", ".join(short_id(m) for m in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise UserError(f"job id prefix {text!r} is ambiguous: it matches {shown}; give more of the id")
    return matches[0]
