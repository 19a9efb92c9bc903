"""What a dataset package is made of, read from the database: the bulk job's rendered rows (one
artifact each) in key order, a page at a time, and its failed rows with the reason.

A row is *rendered* when its artifact exists (the image is in the store, with its sha256), and
*failed* when its render shard ended FAILED or CANCELLED without writing it; every other row is
*pending* (still queued, rendering, or fed later). Rows are read in pages of :data:`PAGE` by key
(keyset pagination: no transaction stays open while shards are written, and memory does not
grow with the bulk job).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.db import session_scope
from storage.models import Artifact, Job, Shard
from storage.status import ShardStatus

PAGE = 1000

# The sample metadata's own fields, from the artifact's recorded parameters (the whole record
# rides along as ``params``).
PARAM_FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "width", "height", "scheduler", "model")


@dataclass(frozen=True)
class RenderedRow:
    """One rendered row: its artifact, as the database has it."""

    row_id: str
    key: str
    sha256: str
    size_bytes: int
    content_type: str
    seed: int | None
    model_hash: str | None
    params: dict[str, Any]
    rendered_at: datetime

    def metadata(self) -> dict[str, Any]:
        """The sample's metadata (``{id}.json``, the Parquet columns): prompt, negative prompt,
        seed, model digest, size, settings, sha256; ``params`` holds every recorded parameter
        (patches, identity and guidance settings included)."""
        fields = {name: self.params.get(name) for name in PARAM_FIELDS}
        return {
            "row_id": self.row_id,
            **fields,
            "seed": self.seed,
            "model_hash": self.model_hash,
            "patches": self.params.get("patches", []),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "key": self.key,
            "rendered_at": self.rendered_at.isoformat(),
            "params": self.params,
        }


@dataclass(frozen=True)
class FailedRow:
    """A row whose render shard ended without it (or whose image could not be packaged)."""

    row_id: str
    key: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"row_id": self.row_id, "key": self.key, "reason": self.reason}


COLUMNS = (
    Artifact.key,
    Artifact.sha256,
    Artifact.size_bytes,
    Artifact.content_type,
    Artifact.seed,
    Artifact.model_hash,
    Artifact.params,
    Artifact.created_at,
)


def rendered_row(artifact: Any) -> RenderedRow:
    """A :class:`RenderedRow` from a row of :data:`COLUMNS` (plain rows: no ORM objects to build;
    the ``package`` step passes its source job's artifacts)."""
    params = dict(artifact.params or {})
    row_id = str(params.get("row_id") or artifact.key.rsplit("/", 1)[-1].rsplit(".", 1)[0])
    return RenderedRow(
        row_id=row_id,
        key=artifact.key,
        sha256=artifact.sha256,
        size_bytes=artifact.size_bytes,
        content_type=artifact.content_type,
        seed=artifact.seed,
        model_hash=artifact.model_hash,
        params=params,
        rendered_at=artifact.created_at,
    )


def rendered_rows(session_factory: Any, bulk_id: uuid.UUID, after: str = "") -> Iterator[RenderedRow]:
    """Every rendered row of the bulk job with a key after ``after``, in key order; one short
    transaction per page."""
    while True:
        with session_scope(session_factory) as session:
            page = [
                rendered_row(a)
                for a in session.execute(
                    select(*COLUMNS)
                    .join(Job, Job.id == Artifact.job_id)
                    .where(Job.bulk_id == bulk_id, Artifact.key > after)
                    .order_by(Artifact.key)
                    .limit(PAGE)
                )
            ]
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].key


def failed_rows(session: Session, bulk_id: uuid.UUID) -> list[FailedRow]:
    """The bulk job's failed rows, in key order, each with its shard's error as the reason."""
    shards = session.execute(
        select(Shard.id, Shard.params, Shard.status, Shard.error)
        .join(Job, Job.id == Shard.job_id)
        .where(Job.bulk_id == bulk_id, Shard.status.in_((ShardStatus.FAILED, ShardStatus.CANCELLED)))
    ).all()
    if not shards:
        return []
    written = set(session.scalars(select(Artifact.key).where(Artifact.shard_id.in_([s.id for s in shards]))))
    failed = []
    for shard in shards:
        reason = shard.error or f"render shard {ShardStatus(shard.status).value}"
        for item in shard.params.get("items", ()):
            if item["key"] not in written:
                failed.append(FailedRow(row_id=str(item.get("row_id") or item["key"]), key=item["key"], reason=reason))
    return sorted(failed, key=lambda row: row.key)


@dataclass(frozen=True)
class Sample:
    """A rendered row with its image's bytes, as a shard writer takes it."""

    row: RenderedRow
    image: bytes

    @property
    def name(self) -> str:
        """The sample's file stem: the row id, its dots written ``%2E`` (WebDataset splits a
        member's name at the first dot; ``%`` is never in an id, so no two rows share a name)."""
        return self.row.row_id.replace(".", "%2E")

    @property
    def ext(self) -> str:
        return self.row.key.rsplit(".", 1)[-1] if "." in self.row.key.rsplit("/", 1)[-1] else "png"

    @property
    def caption(self) -> str:
        return str(self.row.params.get("prompt") or "")

    def metadata_json(self) -> bytes:
        return json.dumps(self.row.metadata(), sort_keys=True, ensure_ascii=False).encode()


def count_rendered(session: Session, bulk_id: uuid.UUID) -> int:
    """How many rows of the bulk job have their artifact."""
    return session.scalar(
        select(func.count()).select_from(Artifact).join(Job, Job.id == Artifact.job_id).where(Job.bulk_id == bulk_id)
    )
