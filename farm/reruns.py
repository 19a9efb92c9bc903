"""``farm rerun``: a new job from the stored spec of another one, with overrides, or only the
items it did not render.

:func:`plan_rerun` reads the parent (a session the caller owns) and returns the new spec as a
dict: the parent's stored spec, its ``idempotency_key`` dropped (the re-run is a job of its own;
an override may give it a new key), the ``--set`` overrides applied (:mod:`farm.spec_overrides`)
and, with ``only_failed``, ``only_items`` set to the parent's items that have no output: the
items of its FAILED or CANCELLED shards without their main output (an item's ``key``). Those
keep their index and seed (:mod:`farm.sharding`), so the re-run renders exactly them; its
outputs go under its own job id, and nothing of the parent is written. The caller validates the
dict as it validates any submitted spec, then :meth:`RerunPlan.check` makes sure the overrides
left the failed items what they were.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.errors import NotFound, UserError
from farm.job_refs import short_id
from farm.job_spec import JobSpec, SpecError
from farm.kinds import job_kind
from farm.spec_overrides import apply_overrides
from storage.models import Artifact, Job, Shard
from storage.status import JOB_TERMINAL, JobStatus, ShardStatus

NOT_RENDERED = (ShardStatus.FAILED, ShardStatus.CANCELLED)


@dataclass(frozen=True)
class RerunPlan:
    """The spec of a re-run (unvalidated), its parent, and the parent's items it must render
    (``failed``: index -> the item as the parent's shard planned it; empty for a whole re-run)."""

    parent_id: uuid.UUID
    owner_id: uuid.UUID
    project_id: uuid.UUID
    raw: dict[str, Any]
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)

    def check(self, spec: JobSpec) -> JobSpec:
        """Refuse overrides that change what the failed items are (their seed, prompt, extra
        axes): ``--only-failed`` re-renders those items, not others at the same indexes."""
        if not self.failed:
            return spec
        wanted = spec.only_items or []
        for index, source in enumerate(job_kind(spec.kind).items(spec)):
            if index > wanted[-1]:
                break
            planned = self.failed.get(index)
            if planned is None:
                continue
            now = {"prompt_index": source.prompt_index, "seed": source.seed, **dict(source.extra)}
            was = {name: planned.get(name) for name in now}
            if now != was:
                changed = ", ".join(f"{name} {was[name]} -> {now[name]}" for name in now if now[name] != was[name])
                raise SpecError(
                    [
                        (
                            "only_items",
                            f"the overrides change failed item {index} ({changed}); --only-failed re-renders the "
                            "items as they were: keep seeds/prompts/images as they are, or re-run without it",
                        )
                    ]
                )
        return spec


def plan_rerun(
    session: Session, job_id: uuid.UUID, *, only_failed: bool = False, overrides: Mapping[str, Any] | None = None
) -> RerunPlan:
    """The new job's spec for a re-run of ``job_id`` (see the module doc)."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.bulk_id is not None:
        raise UserError(
            f"job {short_id(job.id)} is part of a bulk run: re-feed its failed rows with `farm retry BULK_NAME`"
        )
    raw = {k: v for k, v in dict(job.spec).items() if k != "idempotency_key"}
    failed: dict[int, dict[str, Any]] = {}
    if only_failed:
        status = JobStatus(job.status)
        if status not in JOB_TERMINAL:
            raise UserError(
                f"job {short_id(job.id)} is still {status.value}: wait for it (or cancel it) before re-running "
                "its failed items"
            )
        failed = failed_items(session, job.id)
        if not failed:
            raise UserError(
                f"job {short_id(job.id)} has no failed items: every item has its output "
                "(re-run it without --only-failed to render it all again)"
            )
    raw = apply_overrides(raw, overrides or {})
    if only_failed:
        if "only_items" in {path.split(".")[0] for path in overrides or {}}:
            raise SpecError([("only_items", "--only-failed sets it; give one or the other")])
        raw["only_items"] = sorted(failed)
    return RerunPlan(job.id, job.owner_id, job.project_id, raw, failed)


def failed_items(session: Session, job_id: uuid.UUID) -> dict[int, dict[str, Any]]:
    """The job's items that have no output: index -> the item as its shard planned it, for every
    item of a FAILED or CANCELLED shard whose main output (its ``key``) was not written."""
    shards = session.execute(
        select(Shard.id, Shard.params).where(Shard.job_id == job_id, Shard.status.in_(NOT_RENDERED))
    ).all()
    if not shards:
        return {}
    written = set(
        session.scalars(
            select(Artifact.key).where(Artifact.job_id == job_id, Artifact.shard_id.in_([s.id for s in shards]))
        )
    )
    failed: dict[int, dict[str, Any]] = {}
    for shard in shards:
        for item in (shard.params or {}).get("items", ()):
            if item["key"] not in written:
                failed[int(item["index"])] = item
    return dict(sorted(failed.items()))
