"""What a finished job leaves beside its outputs: ``manifest.json`` and a contact sheet PNG."""

from __future__ import annotations

import io
import json
import math
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Artifact, Job
from storage.objects import ObjectStore, manifest_key
from storage.objects.keys import contact_sheet_key

CONTACT_SHEET_MAX = 64  # thumbnails on one sheet
THUMB = 128


def build_manifest(session: Session, job_id: uuid.UUID, summary: dict[str, Any]) -> dict[str, Any]:
    job = session.get(Job, job_id)
    artifacts = session.scalars(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.item_index, Artifact.key)
    ).all()
    return {
        "job": {k: v for k, v in summary.items() if k != "shards"},
        "spec": job.spec,
        "shards": summary["shards"],
        "artifacts": [
            {
                "key": a.key,
                "item_index": a.item_index,
                "seed": a.seed,
                "sha256": a.sha256,
                "size_bytes": a.size_bytes,
                "content_type": a.content_type,
                "model_hash": a.model_hash,
                "params": a.params,
            }
            for a in artifacts
        ],
    }


def contact_sheet(images: list[bytes], columns: int | None = None) -> bytes | None:
    """A grid of thumbnails (PNG bytes), or ``None`` without images."""
    from PIL import Image

    if not images:
        return None
    images = images[:CONTACT_SHEET_MAX]
    columns = columns or min(8, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * THUMB, rows * THUMB), (24, 24, 24))
    for i, data in enumerate(images):
        with Image.open(io.BytesIO(data)) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMB, THUMB))
            x = (i % columns) * THUMB + (THUMB - thumb.width) // 2
            y = (i // columns) * THUMB + (THUMB - thumb.height) // 2
            sheet.paste(thumb, (x, y))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def write_job_outputs(session: Session, store: ObjectStore, job_id: uuid.UUID, summary: dict[str, Any]) -> dict:
    """Write the contact sheet and the manifest; returns the manifest (with the sheet's key)."""
    manifest = build_manifest(session, job_id, summary)
    prefix = session.get(Job, job_id).output_prefix
    images = [
        store.get_bytes(a["key"]) for a in manifest["artifacts"][:CONTACT_SHEET_MAX] if a["content_type"] == "image/png"
    ]
    sheet = contact_sheet(images)
    if sheet is not None:
        key = contact_sheet_key(prefix, job_id)
        store.put_bytes(key, sheet, content_type="image/png")
        manifest["contact_sheet"] = key
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    store.put_bytes(manifest_key(prefix, job_id), data, content_type="application/json")
    manifest["manifest"] = manifest_key(prefix, job_id)
    return manifest
