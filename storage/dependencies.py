"""Jobs that start after other jobs: the ``job_dependency`` rows, the release conditions the feeder
puts in its queries, and the ``cancel`` policy.

A dependent job is split into shards like any job; its shards stay PENDING until the feeder may
send them, and the feeder sends only shards for which :func:`job_released` and
:func:`shard_released` hold. Both are SQL conditions over the tables, evaluated under the
queue's feeder lock, so release is exactly once by construction (a shard is sent by the one
feed that picks it, as every shard is) and survives any process dying: there is no release
message to lose.

A dependency is **met** when its upstream job SUCCEEDED, or, under the ``run_anyway`` policy,
ended at all (partial, failed or cancelled). In ``shard`` mode shard *i* is also released by
the upstream's shard *i* alone: SUCCEEDED (``run_anyway``: ended); a shard with no upstream
shard of its index waits for the upstream job as a whole. Under ``wait`` an upstream that ended
badly holds its dependents until ``farm retry`` makes it run again and it succeeds; under
``cancel`` :func:`cancel_broken_dependents` cancels them (through :mod:`storage.transitions`).
Callers own the transaction.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, false, func, or_, select, true
from sqlalchemy.orm import Session, aliased

from storage.errors import InvalidTransition
from storage.models import Job, JobDependency, Shard
from storage.recovery import unfinished_shard
from storage.status import (
    JOB_ENDED_BADLY,
    JOB_TERMINAL,
    SHARD_TERMINAL,
    DependencyMode,
    DependencyPolicy,
    JobStatus,
    ShardStatus,
)
from storage.transitions import cancel_unstarted_shards, set_job_status

D = JobDependency
UNENDED = (JobStatus.PENDING, JobStatus.RUNNING)
# Aliases made once: an ORM alias costs a millisecond to make, and the feeder's query is built
# on every feed. Each is used inside its own subquery (correlate_except), so reuse is safe.
_UP = aliased(Job, name="upstream")
_UP_SHARD = aliased(Shard, name="upstream_shard")
_MINE = aliased(Shard, name="pending_shard")


@dataclass(frozen=True)
class Upstream:
    """One upstream job a job waits for (resolved), in the order of the spec's ``after``."""

    upstream_id: uuid.UUID
    mode: DependencyMode = DependencyMode.JOB
    policy: DependencyPolicy = DependencyPolicy.WAIT


def add_dependencies(session: Session, job_id: uuid.UUID, upstreams: Iterable[Upstream]) -> int:
    """Record the upstreams of a new job (each once, first place kept). Returns how many."""
    seen: set[uuid.UUID] = set()
    for position, up in enumerate(upstreams):
        if up.upstream_id in seen:
            continue
        seen.add(up.upstream_id)
        session.add(
            JobDependency(job_id=job_id, upstream_id=up.upstream_id, position=position, mode=up.mode, policy=up.policy)
        )
    session.flush()
    return len(seen)


# -- the release conditions -----------------------------------------------------------------------
def _job_met(upstream: Any) -> ColumnElement[bool]:
    """The dependency ``D`` on ``upstream`` (an alias of ``job``) is met by the upstream job."""
    return or_(
        upstream.status == JobStatus.SUCCEEDED,
        and_(D.policy == DependencyPolicy.RUN_ANYWAY, upstream.status.in_(list(JOB_ENDED_BADLY))),
    )


def job_released(job_id: Any) -> ColumnElement[bool]:
    """No ``job``-mode dependency of ``job_id`` (a value or a correlated column) is unmet."""
    up = _UP
    unmet = exists().where(D.job_id == job_id, D.mode == DependencyMode.JOB, up.id == D.upstream_id, ~_job_met(up))
    return ~unmet.correlate_except(D, up)


def _shard_met(upstream_shard: Any) -> ColumnElement[bool]:
    """The dependency ``D`` is met by ``upstream_shard`` (an alias of ``shard``) for its index."""
    return or_(
        upstream_shard.status == ShardStatus.SUCCEEDED,
        and_(D.policy == DependencyPolicy.RUN_ANYWAY, upstream_shard.status.in_(list(SHARD_TERMINAL))),
    )


def shard_released(job_id: Any, index: Any) -> ColumnElement[bool]:
    """No ``shard``-mode dependency of shard ``index`` of ``job_id`` (values or correlated
    columns) is unmet: the upstream job met it, or the upstream's shard ``index`` did."""
    up, up_shard = _UP, _UP_SHARD
    shard_met = exists().where(up_shard.job_id == D.upstream_id, up_shard.index == index, _shard_met(up_shard))
    unmet = exists().where(
        D.job_id == job_id,
        D.mode == DependencyMode.SHARD,
        up.id == D.upstream_id,
        ~_job_met(up),
        ~shard_met.correlate_except(up_shard),  # the dependent's shard is the outer query's, two levels up
    )
    return ~unmet.correlate_except(D, up)


def released(job_id: Any, index: Any) -> ColumnElement[bool]:
    """Shard ``index`` of ``job_id`` may be sent: :func:`job_released` and :func:`shard_released`."""
    return and_(job_released(job_id), shard_released(job_id, index))


def may_feed(job_id: Any, queue: str) -> ColumnElement[bool]:
    """A condition on ``job`` (``job_id``: its correlated id) for the feeder's list of waiting
    jobs: its job-mode dependencies are met and it has a PENDING shard on ``queue`` that its
    shard-mode dependency releases. Cheap for the many jobs without dependencies (a probe of
    ``job_dependency`` each); a shard-mode job is matched by a join of its pending shards with
    the upstream's finished ones through the ``(job_id, status, index)`` index. Exact for the one
    shard-mode upstream a spec allows; the feeder reads the shards themselves with :func:`released`."""
    pending = exists().where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING, Shard.queue == queue)
    up, mine, theirs = _UP, _MINE, _UP_SHARD
    shard_deps_met = ~exists().where(
        D.job_id == job_id, D.mode == DependencyMode.SHARD, up.id == D.upstream_id, ~_job_met(up)
    ).correlate_except(D, up)
    by_shard = (
        exists()
        .where(
            D.job_id == job_id,
            D.mode == DependencyMode.SHARD,
            mine.job_id == job_id,
            mine.status == ShardStatus.PENDING,
            mine.queue == queue,
            theirs.job_id == D.upstream_id,
            theirs.index == mine.index,
            _shard_met(theirs),
        )
        .correlate_except(D, mine, theirs)
    )
    return and_(job_released(job_id), pending, or_(shard_deps_met, by_shard))


# -- what the workers and the finalizer feed -----------------------------------------------------------
def dependent_queues(session: Session, upstream_id: uuid.UUID, mode: DependencyMode | None = None) -> list[str]:
    """The queues where running dependents of ``upstream_id`` (of ``mode`` only, when given) have
    PENDING shards: where the end of an upstream shard or job may have released work."""
    query = (
        select(Shard.queue)
        .join(D, D.job_id == Shard.job_id)
        .join(Job, Job.id == D.job_id)
        .where(D.upstream_id == upstream_id, Job.status == JobStatus.RUNNING, Shard.status == ShardStatus.PENDING)
        .distinct()
    )
    return sorted(session.scalars(query if mode is None else query.where(D.mode == mode)))


# -- the cancel policy ---------------------------------------------------------------------------------
def cancel_broken_dependents(
    session: Session,
    *,
    upstream_ids: list[uuid.UUID] | None = None,
    dependent_ids: list[uuid.UUID] | None = None,
    limit: int = 1000,
) -> list[uuid.UUID]:
    """Cancel the unended jobs whose ``cancel``-policy upstream ended partial, failed or cancelled
    (only those of ``upstream_ids`` / only ``dependent_ids`` when given), with an error naming
    the upstream. A running dependent whose every shard has ended is left for the finalizer (a
    cancel never spoils a finished render). Returns the ids cancelled now."""
    up = aliased(Job)
    query = (
        select(D.job_id, D.upstream_id, up.name, up.status)
        .join(up, up.id == D.upstream_id)
        .join(Job, Job.id == D.job_id)
        .where(D.policy == DependencyPolicy.CANCEL, up.status.in_(list(JOB_ENDED_BADLY)), Job.status.in_(UNENDED))
        .order_by(D.job_id, D.position)
        .limit(limit)
    )
    if upstream_ids is not None:
        query = query.where(D.upstream_id.in_(upstream_ids))
    if dependent_ids is not None:
        query = query.where(D.job_id.in_(dependent_ids))
    cancelled: list[uuid.UUID] = []
    for row in session.execute(query).all():
        if row.job_id in cancelled:
            continue
        status = session.scalar(select(Job.status).where(Job.id == row.job_id).with_for_update())
        if status is None or JobStatus(status) in JOB_TERMINAL:
            continue
        if status == JobStatus.RUNNING and not session.scalar(select(unfinished_shard(row.job_id))):
            continue
        named = f" ({row.name})" if row.name else ""
        ended = JobStatus(row.status).value
        error = f"cancelled: upstream job {row.upstream_id}{named} ended {ended} (after_policy: cancel)"
        try:
            set_job_status(session, row.job_id, JobStatus.CANCELLED, expected=JobStatus(status), error=error)
        except InvalidTransition:
            continue
        cancel_unstarted_shards(session, row.job_id)
        cancelled.append(row.job_id)
    return cancelled


# -- what a job waits for ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocker:
    """An unmet dependency of a job, for people: the upstream, its state, and in ``shard`` mode how
    many of the job's PENDING shards it holds and the first of them with its upstream shard's
    status (``None``: no upstream shard of that index; it waits for the whole job)."""

    upstream_id: uuid.UUID
    name: str | None
    status: JobStatus
    mode: DependencyMode
    policy: DependencyPolicy
    shards_done: int
    shards_total: int
    held: int = 0
    first_index: int | None = None
    first_upstream_status: ShardStatus | None = None
    hidden: bool = False  # outside the viewer's scope: named without its id or name


def _visible(scope: ColumnElement[bool] | None) -> ColumnElement[bool]:
    """Whether the joined job is one the viewer may open (every job when ``scope`` is ``None``)."""
    return true() if scope is None else case((scope, true()), else_=false())


def _link(job_id: uuid.UUID, r: Any, *, kind: bool) -> dict[str, Any]:
    """A linked job as plain data; one the viewer may not open shows only its status (``hidden``)."""
    shown = bool(r.visible)
    link = {
        "id": str(job_id) if shown else None,
        "name": r.name if shown else None,
        "status": JobStatus(r.status).value,
        "mode": DependencyMode(r.mode).value,
        "policy": DependencyPolicy(r.policy).value,
        "hidden": not shown,
    }
    if kind:
        link["kind"] = r.kind if shown else None
    return link


def upstreams(session: Session, job_id: uuid.UUID, scope: ColumnElement[bool] | None = None) -> list[dict[str, Any]]:
    """Every upstream of the job as plain data (id, name, status, mode, policy, hidden), in
    ``after`` order. ``scope``: the jobs the viewer may open (:func:`storage.access.job_scope`);
    an upstream outside it (another project's, submitted by someone in both) keeps only its
    status, mode and policy."""
    rows = session.execute(
        select(D.upstream_id, D.mode, D.policy, Job.name, Job.status, _visible(scope).label("visible"))
        .join(Job, Job.id == D.upstream_id)
        .where(D.job_id == job_id)
        .order_by(D.position)
    ).all()
    return [_link(r.upstream_id, r, kind=False) for r in rows]


def dependents(session: Session, job_id: uuid.UUID, scope: ColumnElement[bool] | None = None) -> list[dict[str, Any]]:
    """The jobs that wait for ``job_id`` (its post-steps among them) as plain data (id, name, kind,
    status, mode, policy, hidden), oldest first; ``scope`` as for :func:`upstreams`."""
    rows = session.execute(
        select(D.job_id, D.mode, D.policy, Job.name, Job.kind, Job.status, _visible(scope).label("visible"))
        .join(Job, Job.id == D.job_id)
        .where(D.upstream_id == job_id)
        .order_by(Job.created_at, Job.id)
    ).all()
    return [_link(r.job_id, r, kind=True) for r in rows]


def blockers(session: Session, job_id: uuid.UUID, scope: ColumnElement[bool] | None = None) -> list[Blocker]:
    """The job's unmet dependencies, in ``after`` order. ``scope``: the jobs the viewer may open;
    an upstream outside it is marked ``hidden`` (its id and name are not for this viewer)."""
    rows = session.execute(
        select(
            D.upstream_id,
            D.mode,
            D.policy,
            Job.name,
            Job.status,
            Job.shards_done,
            Job.shards_total,
            _visible(scope).label("visible"),
        )
        .join(Job, Job.id == D.upstream_id)
        .where(D.job_id == job_id, ~_job_met(Job))
        .order_by(D.position)
    ).all()
    found = []
    for r in rows:
        blocker = Blocker(
            r.upstream_id,
            r.name,
            JobStatus(r.status),
            DependencyMode(r.mode),
            DependencyPolicy(r.policy),
            r.shards_done,
            r.shards_total,
            hidden=not r.visible,
        )
        if blocker.mode == DependencyMode.SHARD:
            held = and_(
                Shard.job_id == job_id, Shard.status == ShardStatus.PENDING, ~shard_released(job_id, Shard.index)
            )
            count, first = session.execute(select(func.count(), func.min(Shard.index)).where(held)).one()
            if not count:
                continue  # every shard of the job was released already
            upstream_status = session.scalar(
                select(Shard.status).where(Shard.job_id == r.upstream_id, Shard.index == first)
            )
            blocker = dataclasses.replace(
                blocker,
                held=int(count),
                first_index=int(first),
                first_upstream_status=ShardStatus(upstream_status) if upstream_status is not None else None,
            )
        found.append(blocker)
    return found
