"""Submitting a post-step (``encode``, ``upscale``, ``contact_sheet``, ``package``): its source job
checked and its outputs placed beside the source's.

:func:`resolve_step` is called by :func:`farm.scheduler.submit_job` for every spec before it is
stored (other kinds pass through unchanged): the step's ``source_job`` must be a job the submitter
may see (:func:`storage.access.job_scope`; another project's job is refused exactly like one that
does not exist), and the step's ``output_prefix`` becomes ``{source prefix}/{source job id}/steps``
(:func:`storage.objects.keys.steps_prefix`), so the step job ``S`` writes under
``{source prefix}/{source job id}/steps/{S}/``. What the source has rendered is read when the step
runs, not here: a step may be submitted before its source has run (with ``after:``).

A step that loads a model (:meth:`~farm.job_spec.JobSpec.runs_model`: ``upscale`` with
``method: img2img``) takes its source job's ``family`` and, unless it names one, its ``model``
(as stored: a ``registry:`` model already pinned to its manifest), so its shards go to that
family's GPU queue and a worker with the model resident reuses it. Its source must be a render job
of a family with an img2img pipeline (sd15, sdxl): a step or an svd job is refused, naming
``method``; a ``family`` or a local model folder of another family is refused, naming the field
(a ``registry:`` model's family is checked where it is pinned, :func:`farm.model_registry.pin_spec_model`).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.errors import UserError
from farm.families import CPU_FAMILY
from farm.job_spec import LOCAL_PATH_PREFIXES, JobSpec, SpecError
from farm.kinds.step import STEP_PREFIX_CHARS, StepSpec
from farm.model_registry import detect_family
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
    query = select(Job.output_prefix, Job.kind, Job.family, Job.spec).where(Job.id == spec.source_job)
    if owner_id is not None:
        query = query.where(job_scope(principal_of(session, owner_id)))
    source = session.execute(query).one_or_none()
    if source is None:
        raise SpecError([("source_job", f"no job {spec.source_job} that you may see")])
    source_prefix = source.output_prefix
    prefix = steps_prefix(source_prefix, spec.source_job)
    if len(prefix) > STEP_PREFIX_CHARS:  # steps of steps of steps ...: keys would grow too long
        raise SpecError([("source_job", f"its outputs' folder is too deep for a step ({len(prefix)} characters)")])
    if "output_prefix" in spec.model_fields_set and spec.output_prefix != prefix:
        reason = f"a step's outputs go beside its source job's ({prefix}); leave output_prefix out"
        raise SpecError([("output_prefix", reason)])
    update: dict[str, Any] = {"output_prefix": prefix}
    if spec.runs_model():
        update.update(_source_model(spec, source.kind, source.family, source.spec or {}))
    return spec.model_copy(update=update)


def _source_model(spec: StepSpec, kind: str, family: str, source_spec: dict[str, Any]) -> dict[str, str]:
    """``model`` and ``family`` of a step that loads a model: its source job's family, and its
    model unless the step names one (of that family)."""
    how = getattr(spec, "method", spec.kind)
    if "source_job" in source_spec or family == CPU_FAMILY:
        reason = f"{how} refines with its source job's model; job {spec.source_job} is a step ({kind}), with none"
        raise SpecError([("method", reason)])
    if family not in spec.families:
        models = " or ".join(f for f in spec.families if f != CPU_FAMILY)
        reason = f"{how} needs a source job on {models}; job {spec.source_job} is {family} (it has no {how} pipeline)"
        raise SpecError([("method", reason)])
    if "family" in spec.model_fields_set and spec.family not in (CPU_FAMILY, family):
        raise SpecError([("family", f"must be the source job's family ({family}), not {spec.family}; leave it out")])
    model = spec.model or str(source_spec.get("model") or "")
    if not model:
        raise SpecError([("source_job", f"job {spec.source_job} names no model to refine with; give one in 'model'")])
    found = _local_family(model)
    if found is not None and found != family:
        raise SpecError([("model", f"{model} is a {found} model; it must be of the source job's family ({family})")])
    return {"model": model, "family": family}


def _local_family(model: str) -> str | None:
    """The family of a local diffusers folder readable here (the embedded mode, or a shared disk);
    ``None`` when it is not one (a hub id, a registry reference, a folder on the workers only)."""
    if not model.startswith(LOCAL_PATH_PREFIXES):
        return None
    try:
        return detect_family(Path(model).expanduser())
    except UserError:
        return None  # no readable pipeline folder of a known family: the worker says why when it loads it


def post_step_specs(spec: JobSpec, job_id: uuid.UUID) -> list[JobSpec]:
    """The jobs a spec's ``post_steps`` become once its job ``job_id`` exists: each step's spec
    with ``source_job`` and ``after`` set to that job (the step waits for it, with the step's own
    ``after_policy``, ``wait`` unless given). Checked already by :func:`farm.specs.parse_spec`."""
    return [parse_spec({**step, "source_job": str(job_id), "after": [str(job_id)]}) for step in spec.post_steps]
