"""Shard leases: which attempt may write a shard's state, and the ends of that attempt.

A worker *claims* a queued shard (or a running one whose lease expired: the holder is presumed
dead). Each claim increments ``attempts`` and the ``fencing_token``; every later write of that
attempt (heartbeat, progress, finish, release, hand back) is guarded by its token, so a
fenced-out attempt's late writes raise :class:`LeaseLost` and change nothing. A worker found lost
has its leases expired at once (:func:`expire_leases`), so the next delivery takes its shards over.

Which status changes are allowed is decided in :mod:`storage.transitions` only: a claim takes a
shard only from a status its table lets go to ``running`` (or an expired lease over), and every
status a leased write sets is checked against the table (``running`` -> it) before the write.
Functions take a session and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from storage.errors import InvalidTransition, LeaseLost, NotFound
from storage.models import Artifact, Shard, utcnow
from storage.status import SHARD_TERMINAL, ShardStatus
from storage.transitions import SHARD_TRANSITIONS, check_shard_transition

S = ShardStatus

# The statements every shard runs are Core statements on the table: the same SQL without the
# ORM's per-statement bookkeeping (the caller's session still owns the transaction).
SHARD = Shard.__table__
MAX_KEPT_ERRORS = 20  # errors kept on a shard (its history of failed attempts and take-overs)


@dataclass(frozen=True)
class ShardLease:
    """The right of one attempt to write a shard's state, valid while ``fencing_token`` is current."""

    shard_id: uuid.UUID
    job_id: uuid.UUID
    owner: str
    attempt: int
    fencing_token: int
    expires_at: datetime


@dataclass(frozen=True)
class ShardClaim:
    """One try at claiming a shard, with what the render needs read in the same round trip:
    ``lease`` is ``None`` when the shard was not taken (terminal, held by a live lease, a lost
    race, or a crash loop); ``status`` and ``lease_expires_at`` are then as read."""

    lease: ShardLease | None
    job_id: uuid.UUID
    queue: str
    index: int
    params: dict[str, Any]
    status: ShardStatus
    lease_expires_at: datetime | None

    def lease_remaining(self, now: datetime | None = None) -> float | None:
        """Seconds until the lease the claim found expires (``None`` unless the shard is running)."""
        if self.lease is not None or self.status != S.RUNNING or self.lease_expires_at is None:
            return None
        return max(0.0, (self.lease_expires_at - (now or utcnow())).total_seconds())


def claim_shard(
    session: Session,
    shard_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
    *,
    max_attempts: int | None = None,
) -> ShardLease | None:
    """Take a shard for rendering. Returns ``None`` when it is terminal, held by a live lease, or
    another claimer won the race; a lease that expired is taken over, unless the shard has used
    ``max_attempts`` already (a crash loop: :func:`storage.recovery.fail_crash_loop` ends it)."""
    claim = claim_shard_to_render(session, shard_id, owner, lease_seconds, now, max_attempts=max_attempts)
    if claim is None:
        raise NotFound(f"no shard {shard_id}")
    return claim.lease


def claim_shard_to_render(
    session: Session,
    shard_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
    *,
    max_attempts: int | None = None,
) -> ShardClaim | None:
    """:func:`claim_shard`, returning with the lease the shard's queue, index and params (one
    SELECT and one UPDATE in all); ``None`` when there is no such shard. A change that is not a
    claim landing between our read and our write (the scheduler marking the shard queued) is no
    reason to give up: read again."""
    now = now or utcnow()
    claim: ShardClaim | None = None
    c = SHARD.c
    for _ in range(5):
        row = session.execute(
            select(
                c.status,
                c.lease_owner,
                c.lease_expires_at,
                c.fencing_token,
                c.attempts,
                c.errors,
                c.job_id,
                c.queue,
                c.index,
                c.params,
            ).where(c.id == shard_id)
        ).one_or_none()
        if row is None:
            return None
        claim = ShardClaim(None, row.job_id, row.queue, row.index, row.params, S(row.status), row.lease_expires_at)
        takeover = row.status == S.RUNNING and row.lease_expires_at is not None and row.lease_expires_at <= now
        if S.RUNNING not in SHARD_TRANSITIONS[ShardStatus(row.status)] and not takeover:  # pending or queued only
            return claim
        if takeover and max_attempts is not None and row.attempts >= max_attempts:
            return claim
        lease = _try_claim(session, shard_id, owner, lease_seconds, now, row, takeover)
        if lease is not None:
            return ShardClaim(lease, row.job_id, row.queue, row.index, row.params, S.RUNNING, lease.expires_at)
    return claim


def _try_claim(
    session: Session, shard_id: uuid.UUID, owner: str, lease_seconds: float, now: datetime, row: Any, takeover: bool
) -> ShardLease | None:
    """The guarded claim of a shard last read as ``row``; ``None`` when the row changed since."""
    values: dict[str, Any] = {}
    if takeover:
        note = f"attempt {row.attempts} by {row.lease_owner}: lease expired at {row.lease_expires_at.isoformat()}"
        values["errors"] = [*(row.errors or []), note][-MAX_KEPT_ERRORS:]
    expires = now + timedelta(seconds=lease_seconds)
    c = SHARD.c
    guard = [c.id == shard_id, c.status == row.status, c.fencing_token == row.fencing_token]
    if takeover:  # a heartbeat that lands between our read and this update keeps the lease with its holder
        guard.append(c.lease_expires_at <= now)
    result = session.execute(
        update(SHARD)
        .where(*guard)
        .values(
            status=S.RUNNING,
            attempts=row.attempts + 1,
            fencing_token=row.fencing_token + 1,
            lease_owner=owner,
            lease_expires_at=expires,
            heartbeat_at=now,
            started_at=now,
            updated_at=now,
            preempt_requested_at=None,
            **values,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    return ShardLease(shard_id, row.job_id, owner, row.attempts + 1, row.fencing_token + 1, expires)


def _leased_update(session: Session, lease: ShardLease, values: dict[str, Any], what: str) -> None:
    """The fencing guard: write ``values`` only while ``lease`` is the shard's current attempt and the
    shard is running; raise :class:`LeaseLost` otherwise. A status in ``values`` must be one the
    transition table allows from ``running``."""
    if "status" in values:
        check_shard_transition(S.RUNNING, values["status"])
    c = SHARD.c
    result = session.execute(
        update(SHARD)
        .where(c.id == lease.shard_id, c.fencing_token == lease.fencing_token, c.status == S.RUNNING)
        .values(updated_at=utcnow(), **values)
    )
    if result.rowcount != 1:
        raise LeaseLost(
            f"shard {lease.shard_id}: attempt {lease.attempt} (token {lease.fencing_token}) was fenced out; "
            f"its {what} is refused"
        )


def renew_lease(
    session: Session,
    lease: ShardLease,
    lease_seconds: float,
    *,
    now: datetime | None = None,
    items_done: int | None = None,
    progress: float | None = None,
) -> ShardLease:
    """Heartbeat: push the expiry out (and record progress). Raises :class:`LeaseLost` when fenced out."""
    now = now or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    values: dict[str, Any] = {"lease_expires_at": expires, "heartbeat_at": now}
    if items_done is not None:
        values["items_done"] = items_done
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    _leased_update(session, lease, values, "heartbeat")
    return ShardLease(lease.shard_id, lease.job_id, lease.owner, lease.attempt, lease.fencing_token, expires)


def add_artifacts(
    session: Session, lease: ShardLease, rows: list[dict[str, Any]], *, maybe_written: bool = False
) -> None:
    """Insert the artifact rows of outputs this attempt uploaded, stamped with its fencing token.
    Call it after a leased write (a renewal, the attempt's end) in the same transaction: a
    fenced-out attempt's rows then never land. ``maybe_written``: an earlier try of this write may
    have committed before its connection dropped, so rows already there are left out."""
    if maybe_written and rows:
        there = set(session.scalars(select(Artifact.key).where(Artifact.key.in_([row["key"] for row in rows]))))
        rows = [row for row in rows if row["key"] not in there]
    if rows:
        session.execute(insert(Artifact.__table__), [{**row, "fencing_token": lease.fencing_token} for row in rows])


def check_lease(session: Session, lease: ShardLease) -> None:
    """Raise :class:`LeaseLost` unless this attempt still holds the shard (e.g. before uploading)."""
    token = session.scalar(select(Shard.fencing_token).where(Shard.id == lease.shard_id, Shard.status == S.RUNNING))
    if token != lease.fencing_token:
        raise LeaseLost(f"shard {lease.shard_id}: attempt {lease.attempt} no longer holds the lease")


def lease_remaining(session: Session, shard_id: uuid.UUID, now: datetime | None = None) -> float | None:
    """Seconds until a running shard's lease expires (``None`` when it is not running)."""
    row = session.execute(select(Shard.status, Shard.lease_expires_at).where(Shard.id == shard_id)).one_or_none()
    if row is None or row.status != S.RUNNING or row.lease_expires_at is None:
        return None
    return max(0.0, (row.lease_expires_at - (now or utcnow())).total_seconds())


def expire_leases(session: Session, owners: list[str], now: datetime | None = None) -> int:
    """End the live leases of ``owners`` now (they are lost): their shards can be taken over by
    the next delivery instead of when the leases run out. Returns how many."""
    now = now or utcnow()
    result = session.execute(
        update(Shard)
        .where(Shard.status == S.RUNNING, Shard.lease_owner.in_(owners), Shard.lease_expires_at > now)
        .values(lease_expires_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


# -- the end of an attempt ----------------------------------------------------------------------


def _failure_history(session: Session, lease: ShardLease) -> Any:
    """The shard's kept errors and the workers it has failed on, as they stand."""
    return session.execute(select(Shard.errors, Shard.failed_workers).where(Shard.id == lease.shard_id)).one()


def _failure_values(history: Any, lease: ShardLease, error: str) -> dict[str, Any]:
    """The error kept on the shard, its error history, and the workers it has failed on, with
    this attempt's failure added to ``history``."""
    errors = [*(history.errors or []), f"attempt {lease.attempt} by {lease.owner}: {error}"][-MAX_KEPT_ERRORS:]
    workers = list(history.failed_workers or [])
    if lease.owner not in workers:
        workers.append(lease.owner)
    return {"error": error, "errors": errors, "failed_workers": workers}


def finish_shard(
    session: Session,
    lease: ShardLease,
    to: ShardStatus,
    *,
    error: str | None = None,
    timings: dict[str, Any] | None = None,
    items_done: int | None = None,
    now: datetime | None = None,
) -> None:
    """End the attempt with a terminal status. Raises :class:`LeaseLost` when fenced out."""
    failure = _failure_values(_failure_history(session, lease), lease, error) if error else None
    _finish(session, lease, to, error, failure, timings, items_done, now)


def _finish(
    session: Session,
    lease: ShardLease,
    to: ShardStatus,
    error: str | None,
    failure: dict[str, Any] | None,
    timings: dict[str, Any] | None = None,
    items_done: int | None = None,
    now: datetime | None = None,
) -> None:
    to = ShardStatus(to)
    if to not in SHARD_TERMINAL:
        raise InvalidTransition(f"finish_shard needs a terminal status, not {to.value}")
    check_shard_transition(S.RUNNING, to)
    now = now or utcnow()
    values: dict[str, Any] = {
        "status": to,
        "finished_at": now,
        "lease_expires_at": None,  # the owner stays: it is who ran the final attempt
        "error": error,
    }
    if to == S.SUCCEEDED:
        values["progress"] = 1.0
    if failure is not None:
        values["errors"] = failure["errors"]
        if to == S.FAILED:
            values["failed_workers"] = failure["failed_workers"]
    if timings is not None:
        values["timings"] = timings
    if items_done is not None:
        values["items_done"] = items_done
    _leased_update(session, lease, values, f"finish as {to.value}")


def release_shard_for_retry(session: Session, lease: ShardLease, error: str) -> None:
    """A retryable failure: back to QUEUED with the error kept, for this or another worker."""
    _release(session, lease, _failure_values(_failure_history(session, lease), lease, error))


def _release(
    session: Session, lease: ShardLease, failure: dict[str, Any], memory: dict[str, Any] | None = None
) -> None:
    values = {"status": S.QUEUED, "lease_owner": None, "lease_expires_at": None, "progress": 0.0, "items_done": 0}
    if memory is not None:
        params = session.scalar(select(Shard.params).where(Shard.id == lease.shard_id))
        values["params"] = {**params, "memory": memory}
    _leased_update(session, lease, {**values, **failure}, "release for retry")


def hand_back(
    session: Session, lease: ShardLease, *, preempted: bool = False, items_done: int | None = None, items: int = 0
) -> None:
    """End an attempt that stopped early on purpose (not a failure): the shard is QUEUED again
    (to be sent at once), or PENDING when it was ``preempted`` (or its worker is draining: the
    feeder sends it in its turn), with the items it wrote kept (``items_done`` of ``items``, when
    given, is recorded as they stand: the last progress write may be older); the attempt does not
    count against ``max_attempts``. Raises :class:`LeaseLost` when fenced out."""
    values: dict[str, Any] = {
        "status": S.PENDING if preempted else S.QUEUED,
        "lease_owner": None,
        "lease_expires_at": None,
        "attempts": lease.attempt - 1,
        "preempt_requested_at": None,
    }
    if items_done is not None:
        values["items_done"] = items_done
        values["progress"] = min(1.0, items_done / items) if items else 0.0
    _leased_update(session, lease, values, "hand back")


def record_failure(
    session: Session,
    lease: ShardLease,
    error: str,
    *,
    retryable: bool,
    max_attempts: int,
    max_workers: int,
    timings: dict[str, Any] | None = None,
    memory: dict[str, Any] | None = None,
) -> ShardStatus:
    """End a failed attempt: QUEUED again when the failure is retryable, attempts are left and
    the shard has failed on fewer than ``max_workers`` different workers; FAILED for good
    otherwise. Every error is kept. ``memory``: the limits a retry renders under (after an
    out-of-memory), kept in the shard's params. Returns the new status."""
    history = _failure_history(session, lease)
    failure = _failure_values(history, lease, error)
    workers = failure["failed_workers"]
    if retryable and lease.attempt < max_attempts and len(workers) < max_workers:
        _release(session, lease, failure, memory)
        return S.QUEUED
    if retryable and len(workers) >= max_workers and lease.attempt < max_attempts:
        error = f"{error} (failed on {len(workers)} different workers: {', '.join(workers)})"
        failure = _failure_values(history, lease, error)  # the kept error says why, too
    _finish(session, lease, S.FAILED, error, failure, timings)
    return S.FAILED
