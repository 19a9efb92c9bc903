"""What a client hands back about jobs, the same whichever way it reaches the farm (directly or
through the API): :class:`Submitted`, how many shards a summary lists (:func:`shard_limit`), and
when a waited-for job counts as over (:func:`settled`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm.errors import UserError

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Submitted:
    """What a submit did: the job's id, whether it is new (``False``: its ``idempotency_key`` was
    already used, for the same spec), and its status."""

    job_id: uuid.UUID
    created: bool
    status: str


def settled(summary: dict[str, Any]) -> bool:
    """A cancelled job is settled once no shard is still running."""
    return summary["status"] != "cancelled" or not summary["shards_by_status"].get("running", 0)


def shard_limit(shards: int | str) -> int | None:
    """How many shards a summary lists: a count (0 or more), or ``"all"`` (``None``: every one)."""
    if isinstance(shards, str):
        if shards.strip().lower() == "all":
            return None
        try:
            shards = int(shards)
        except ValueError:
            raise UserError(f"shards: give a number or 'all', not {shards!r}") from None
    if shards < 0:
        raise UserError(f"shards: give a number (0 or more) or 'all', not {shards}")
    return shards
