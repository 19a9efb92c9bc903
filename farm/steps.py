"""Submitting a post-step (``encode``, ``upscale``, ``contact_sheet``, ``package``): its source job
checked and its outputs placed beside the source's.

:func:`resolve_step` is called by :func:`farm.scheduler.submit_job` for every spec before it is
stored (other kinds pass through unchanged): the step's ``source_job`` must be a job the submitter
may see (:func:`storage.access.job_scope`; another project's job is refused exactly like one that
does not exist), and the step's ``output_prefix`` becomes ``{source prefix}/{source job id}/steps``
(:func:`storage.objects.keys.steps_prefix`), so the step job ``S`` writes under
``{source prefix}/{source job id}/steps/{S}/``. What the source has rendered is read when the step
runs, not here: a step may be submitted before its source has run (with ``after:``).
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.job_spec import JobSpec, SpecError
from farm.kinds.step import STEP_PREFIX_CHARS, StepSpec
from farm.specs import parse_spec
from storage.access import job_scope
from storage.identity import principal_of
from storage.models import Job
from storage.objects.keys import steps_prefix


def resolve_step(session: Session, spec: JobSpec, owner_id: uuid.UUID | None) -> JobSpec:
    """``spec`` as it is stored: a step's ``output_prefix`` set from its source job, which must
    exist in ``owner_id``'s scope (``None``: the admin in direct mode, who sees every job); else
    :class:`SpecError` naming ``source_job`` (or ``output_prefix`` when one was given)."""
    if not isinstance(spec, StepSpec):
        return spec
    query = select(Job.output_prefix).where(Job.id == spec.source_job)
    if owner_id is not None:
        query = query.where(job_scope(principal_of(session, owner_id)))
    source_prefix = session.scalar(query)
    if source_prefix is None:
        raise SpecError([("source_job", f"no job {spec.source_job} that you may see")])
    prefix = steps_prefix(source_prefix, spec.source_job)
    if len(prefix) > STEP_PREFIX_CHARS:  # steps of steps of steps ...: keys would grow too long
        raise SpecError([("source_job", f"its outputs' folder is too deep for a step ({len(prefix)} characters)")])
    if "output_prefix" in spec.model_fields_set and spec.output_prefix != prefix:
        reason = f"a step's outputs go beside its source job's ({prefix}); leave output_prefix out"
        raise SpecError([("output_prefix", reason)])
    return spec.model_copy(update={"output_prefix": prefix})


def post_step_specs(spec: JobSpec, job_id: uuid.UUID) -> list[JobSpec]:
    """The jobs a spec's ``post_steps`` become once its job ``job_id`` exists: each step's spec
    with ``source_job`` and ``after`` set to that job (the step waits for it, with the step's own
    ``after_policy``, ``wait`` unless given). Checked already by :func:`farm.specs.parse_spec`."""
    return [parse_spec({**step, "source_job": str(job_id), "after": [str(job_id)]}) for step in spec.post_steps]
