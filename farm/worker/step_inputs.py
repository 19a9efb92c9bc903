"""What every post-step runner (``encode``, ``upscale``, ``contact_sheet``, ``package``) shares:
the source job's outputs as the database has them now, each read back checked against its
sha256, the lineage its outputs record, and the JSON record that ends a step's item.

Bad input is the step's, not the worker's: a source without the outputs a step needs, an input
whose bytes differ from its recorded sha256, an input that does not decode, ffmpeg refusing the
frames: :class:`StepInputError` (a :class:`~farm.errors.UserError`), so the shard fails at once
with the reason, the job ends FAILED or PARTIAL, and the worker takes its next shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from farm.errors import ObjectNotFound, UserError
from farm.worker.shard_run import ShardRun
from storage.db import session_scope
from storage.models import Artifact

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # an input image larger than this is refused (decompression bombs)


class StepInputError(UserError):
    """A step's input is missing, changed or unusable; the message names the input and why."""


@dataclass(frozen=True)
class SourceOutput:
    """One output of the source job: its artifact row (the columns of ``farm.datasets.rows.COLUMNS``
    and its item's place)."""

    key: str
    sha256: str
    size_bytes: int
    content_type: str
    item_index: int
    seed: int | None
    model_hash: str | None
    params: dict[str, Any]
    created_at: datetime

    @property
    def stem(self) -> str:
        """The file name without its extension: ``000003-s42-f00001``."""
        return self.key.rsplit("/", 1)[-1].rsplit(".", 1)[0]

    @property
    def is_image(self) -> bool:
        """A still or a video frame (PNG); GIF previews and mp4s are not."""
        return self.content_type == "image/png"

    def lineage(self) -> dict[str, str]:
        return {"key": self.key, "sha256": self.sha256}


def source_outputs(run: ShardRun) -> list[SourceOutput]:
    """Every output of the step's source job now, in item order (then key order)."""
    source: uuid.UUID = run.spec.source_job

    def read() -> list[SourceOutput]:
        with session_scope(run.res.session_factory) as session:
            rows = session.execute(
                select(
                    Artifact.key,
                    Artifact.sha256,
                    Artifact.size_bytes,
                    Artifact.content_type,
                    Artifact.item_index,
                    Artifact.seed,
                    Artifact.model_hash,
                    Artifact.params,
                    Artifact.created_at,
                )
                .where(Artifact.job_id == source)
                .order_by(Artifact.item_index, Artifact.key)
            ).all()
        return [SourceOutput(*row[:7], dict(row.params or {}), row.created_at) for row in rows]

    return run.res.outlast(read, f"shard {run.shard_id}: reading the outputs of job {source}", run.keeper.check)


def source_images(run: ShardRun) -> list[SourceOutput]:
    """The source's PNG outputs (stills and video frames); :class:`StepInputError` when it has none."""
    images = [output for output in source_outputs(run) if output.is_image]
    if not images:
        raise StepInputError(f"source job {run.spec.source_job} has no images (PNG outputs) to {run.spec.kind}")
    return images


def read_input(run: ShardRun, source: SourceOutput) -> bytes:
    """The input's bytes from the store, checked against the sha256 its source recorded."""
    try:
        data = run.res.outlast(
            lambda: run.store.get_bytes(source.key), f"shard {run.shard_id}: reading {source.key}", run.keeper.check
        )
    except ObjectNotFound:
        raise StepInputError(f"input {source.key}: missing from the store") from None
    found = hashlib.sha256(data).hexdigest()
    if found != source.sha256:
        raise StepInputError(
            f"input {source.key}: its bytes in the store (sha256 {found[:12]}...) differ from the sha256 the "
            f"source job recorded ({source.sha256[:12]}...); refusing to use a changed input"
        )
    return data


def decode_image(source: SourceOutput, data: bytes) -> Any:
    """The input as a loaded RGB PIL image; :class:`StepInputError` when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise StepInputError(f"input {source.key}: {image.width}x{image.height} is too large to read")
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, StepInputError):
            raise
        raise StepInputError(f"input {source.key}: not a readable image ({exc})") from None


def lineage_params(run: ShardRun, inputs: Iterable[SourceOutput], **settings: Any) -> dict[str, Any]:
    """What a step's output records: the step, its job and source job, its settings, and every
    input it was made from (key and sha256, as the source recorded them and as read)."""
    return {
        "step": run.spec.kind,
        "job_id": str(run.job_id),
        "source_job": str(run.spec.source_job),
        **settings,
        "inputs": [source.lineage() for source in inputs],
    }


@dataclass
class StepOutputs:
    """The outputs one item of a step wrote (key and sha256), for its closing record."""

    run: ShardRun
    item: dict[str, Any]
    written: list[dict[str, str]]
    inputs: dict[str, str]  # key -> sha256 of every input read

    @classmethod
    def start(cls, run: ShardRun, item: dict[str, Any]) -> StepOutputs:
        return cls(run, item, [], {})

    def record(self, key: str, data: bytes, content_type: str, params: dict[str, Any], progress: float) -> None:
        """Upload one output of the item (with its lineage in ``params``) and note it."""
        self.run.record(key, data, content_type, item=self.item, params=params, progress=progress)
        self.written.append({"key": key, "sha256": hashlib.sha256(data).hexdigest()})
        self.inputs.update((i["key"], i["sha256"]) for i in params.get("inputs", ()))

    def finish(self, **summary: Any) -> None:
        """The item's record at its key (JSON: what it read and wrote); the item is done."""
        record = {
            "step": self.run.spec.kind,
            "job_id": str(self.run.job_id),
            "source_job": str(self.run.spec.source_job),
            "part": int(self.item.get("part", 0)),
            **summary,
            "outputs": self.written,
            "inputs": [{"key": key, "sha256": sha} for key, sha in self.inputs.items()],
        }
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        params = {k: v for k, v in record.items() if k not in ("outputs", "inputs")}
        params["outputs"] = [entry["key"] for entry in self.written]
        self.run.record(
            self.item["key"], data, "application/json", item=self.item, params=params, progress=1.0, item_finished=True
        )
