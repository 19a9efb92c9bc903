"""The worker registry: who is serving which queues, on what hardware, and when it last spoke.

A worker process registers at start (:func:`register_worker`), heartbeats while it runs
(:func:`worker_heartbeat`) and says goodbye at a clean shutdown (:func:`stop_worker`). A worker
silent for longer than the timeout is marked lost by :func:`sweep_lost_workers` (every live
worker sweeps as it heartbeats), which also expires the leases it held so its shards can be taken
over at once instead of when their leases run out.

A worker told to stop (SIGTERM) is marked draining at once (:func:`mark_draining`): it takes no new
work and counts as no queue's consumer (the feeder's windows, the reconciler, ``farm workers``),
while it heartbeats until its current shard has handed back and it stops.

Worker: online -> lost (silent) | draining (told to stop) | stopped (clean exit);  lost -> online
(it spoke again) | stopped; draining -> stopped | lost (silent); stopped -> online (the same name
registered again). Callers own the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from storage.chunking import chunked
from storage.leases import expire_leases
from storage.models import Job, Shard, Worker, utcnow
from storage.status import ShardStatus, WorkerStatus

W = WorkerStatus


def register_worker(
    session: Session,
    *,
    name: str,
    hostname: str,
    queues: Sequence[str],
    device: str,
    gpu_name: str | None = None,
    gpu_memory_bytes: int | None = None,
    pinned_models: Sequence[str] = (),
    now: datetime | None = None,
) -> None:
    """Insert or refresh the worker's row: online from now."""
    now = now or utcnow()
    values: dict[str, Any] = {
        "hostname": hostname,
        "queues": list(queues),
        "device": device,
        "gpu_name": gpu_name,
        "gpu_memory_bytes": gpu_memory_bytes,
        "pinned_models": list(pinned_models),
        "status": W.ONLINE,
        "current_shard_id": None,
        "idle_since": now,
        "started_at": now,
        "heartbeat_at": now,
        "updated_at": now,
    }
    result = session.execute(update(Worker).where(Worker.name == name).values(**values))
    if result.rowcount == 0:
        session.add(Worker(name=name, **values))
        session.flush()


def worker_heartbeat(
    session: Session,
    name: str,
    *,
    current_shard_id: uuid.UUID | None = None,
    pinned_models: Sequence[str] | None = None,
    draining: bool = False,
    now: datetime | None = None,
) -> bool:
    """Record that the worker is alive (a lost worker that speaks again is online again, or
    draining when ``draining``; a draining worker stays draining). Returns False when it has no
    row or its row says stopped (it must register)."""
    now = now or utcnow()
    values: dict[str, Any] = {
        "heartbeat_at": now,
        "current_shard_id": current_shard_id,
        "status": W.DRAINING if draining else case((Worker.status == W.DRAINING, W.DRAINING), else_=W.ONLINE),
        "idle_since": None if current_shard_id is not None else func.coalesce(Worker.idle_since, now),
    }
    if pinned_models is not None:
        values["pinned_models"] = list(pinned_models)
    result = session.execute(
        update(Worker)
        .where(Worker.name == name, Worker.status.in_([W.ONLINE, W.LOST, W.DRAINING]))
        .values(updated_at=now, **values)
    )
    return result.rowcount == 1


def mark_draining(session: Session, name: str, now: datetime | None = None) -> bool:
    """The worker was told to stop: from now on it is no queue's consumer (it finishes or hands
    back its current shard, then stops). False when it has no row or has stopped already."""
    now = now or utcnow()
    result = session.execute(
        update(Worker)
        .where(Worker.name == name, Worker.status.in_([W.ONLINE, W.LOST, W.DRAINING]))
        .values(status=W.DRAINING, heartbeat_at=now, updated_at=now)
    )
    return result.rowcount == 1


def stop_worker(session: Session, name: str) -> None:
    """A clean shutdown: stopped, holding nothing."""
    session.execute(
        update(Worker).where(Worker.name == name).values(status=W.STOPPED, current_shard_id=None, updated_at=utcnow())
    )


def sweep_lost_workers(session: Session, lost_after_s: float, now: datetime | None = None) -> list[str]:
    """Mark online (or draining) workers silent for longer than ``lost_after_s`` lost, and expire
    the leases they hold. Returns their names."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lost_after_s)
    alive = Worker.status.in_([W.ONLINE, W.DRAINING])
    names = list(session.scalars(select(Worker.name).where(alive, Worker.heartbeat_at < cutoff)))
    for chunk in chunked(names):
        session.execute(
            update(Worker)
            .where(Worker.name.in_(chunk), alive, Worker.heartbeat_at < cutoff)
            .values(status=W.LOST, current_shard_id=None, updated_at=now)
        )
        expire_leases(session, chunk, now)
    return names


def live_workers(session: Session, queue: str, lost_after_s: float, now: datetime | None = None) -> list[str]:
    """Names of the workers online and heard from within ``lost_after_s`` that consume ``queue``."""
    cutoff = (now or utcnow()) - timedelta(seconds=lost_after_s)
    rows = session.execute(
        select(Worker.name, Worker.queues).where(Worker.status == W.ONLINE, Worker.heartbeat_at >= cutoff)
    )
    return [name for name, queues in rows if queue in (queues or [])]


@dataclass(frozen=True)
class Consumer:
    """A live worker consuming a queue: the shard it renders, or since when it holds none."""

    name: str
    current_shard_id: uuid.UUID | None
    idle_since: datetime | None


def queue_consumers(session: Session, lost_after_s: float, now: datetime | None = None) -> dict[str, list[Consumer]]:
    """The workers online and heard from within ``lost_after_s``, by each queue they consume."""
    cutoff = (now or utcnow()) - timedelta(seconds=lost_after_s)
    rows = session.execute(
        select(Worker.name, Worker.queues, Worker.current_shard_id, Worker.idle_since).where(
            Worker.status == W.ONLINE, Worker.heartbeat_at >= cutoff
        )
    )
    found: dict[str, list[Consumer]] = {}
    for row in rows:
        for queue in row.queues or []:
            found.setdefault(queue, []).append(Consumer(row.name, row.current_shard_id, row.idle_since))
    return found


def list_workers(session: Session, lost_after_s: float, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every registered worker as plain data, newest first. A worker whose row still says online
    (or draining) but that has been silent past the timeout is shown lost. Its current shard is
    the one it holds a lease on."""
    now = now or utcnow()
    running = session.execute(
        select(Shard.lease_owner, Shard.id, Shard.index, Shard.job_id, Shard.progress, Job.kind)
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at > now)
    ).all()
    holding = {row.lease_owner: row for row in running}
    out = []
    for w in session.scalars(select(Worker).order_by(Worker.started_at.desc())):
        silent = (now - w.heartbeat_at).total_seconds()
        status = W(w.status)
        if status in (W.ONLINE, W.DRAINING) and silent > lost_after_s:
            status = W.LOST
        shard = holding.get(w.name) if status in (W.ONLINE, W.DRAINING) else None
        out.append(
            {
                "name": w.name,
                "status": status.value,
                "hostname": w.hostname,
                "queues": list(w.queues or []),
                "device": w.device,
                "gpu_name": w.gpu_name,
                "gpu_memory_bytes": w.gpu_memory_bytes,
                "pinned_models": list(w.pinned_models or []),
                "started_at": w.started_at.isoformat(),
                "heartbeat_at": w.heartbeat_at.isoformat(),
                "silent_s": round(silent, 1),
                "current_shard": None
                if shard is None
                else {
                    "id": str(shard.id),
                    "job_id": str(shard.job_id),
                    "index": shard.index,
                    "kind": shard.kind,
                    "progress": round(shard.progress, 4),
                },
            }
        )
    return out
