"""A spec's ``after:`` resolved at submit: each entry names one job the submitter may see.

An entry is, in this order: a whole job id; the ``name`` of one of the submitter's own jobs
(their most recent job of that name: names may repeat, e.g. a nightly pipeline submitted again;
a name wins over an id prefix it happens to spell); a unique id prefix. Ids and prefixes are
looked up only within the submitter's scope (:func:`storage.access.job_scope`), so another
project's job is refused exactly as one that does not exist. Every entry that names no job is a
:class:`~farm.job_spec.SpecError` naming ``after[i]``. Cycles cannot happen: an upstream
exists before its dependent is written.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.errors import NotFound, UserError
from farm.job_refs import MIN_PREFIX, resolve_job_id
from farm.job_spec import UUID_FORM_RE, JobSpec, SpecError
from storage.dependencies import Upstream
from storage.models import Job
from storage.status import DependencyMode, DependencyPolicy


def resolve_after(session: Session, spec: JobSpec, owner_id: uuid.UUID, scope: Any = None) -> list[Upstream]:
    """The upstream jobs of ``spec`` (in ``after`` order, each once), for a job of ``owner_id``;
    ``scope``: a condition on :class:`Job` limiting what ids may name (``None``: every job)."""
    problems: list[tuple[str, str]] = []
    found: list[uuid.UUID] = []
    for i, ref in enumerate(spec.after):
        try:
            job_id = _resolve_one(session, ref, owner_id, scope)
        except (NotFound, UserError) as exc:
            problems.append((f"after[{i}]", f"{ref!r}: {_reason(exc)}"))
            continue
        if job_id not in found:
            found.append(job_id)
    if problems:
        raise SpecError(problems)
    mode, policy = DependencyMode(spec.after_mode), DependencyPolicy(spec.after_policy)
    return [Upstream(job_id, mode, policy) for job_id in found]


def _resolve_one(session: Session, ref: str, owner_id: uuid.UUID, scope: Any) -> uuid.UUID:
    if UUID_FORM_RE.fullmatch(ref) is None:
        query = select(Job.id).where(Job.owner_id == owner_id, Job.name == ref)
        named = session.scalar(
            (query if scope is None else query.where(scope)).order_by(Job.created_at.desc(), Job.id.desc()).limit(1)
        )
        if named is not None:
            return named
        if not _id_like(ref):
            raise NotFound(f"no job named {ref!r}")
    return resolve_job_id(session, ref, scope=scope)


def _id_like(ref: str) -> bool:
    digits = ref.replace("-", "").lower()
    return len(digits) >= MIN_PREFIX and all(ch in "0123456789abcdef" for ch in digits)


def _reason(exc: Exception) -> str:
    if isinstance(exc, NotFound):
        return "no job of yours has this name and no job you can see has this id (or id prefix)"
    return str(exc)  # an ambiguous prefix: it says which jobs it matches
