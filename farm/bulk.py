"""Bulk dataset renders: manifest rows become shards of normal jobs, inserted in bulk and fed to
the queues a window at a time (:mod:`farm.feeder`).

:func:`submit_bulk` groups rows by their overrides (one job per group: same model family, model
and settings, so workers keep their models warm), writes the jobs and their shards (PENDING) with
bulk inserts, and returns without publishing anything. Submitting the same name again (the next
night, or after a crash) adds only rows whose ids it does not have: rows already rendered are
never rendered again, rows in flight carry on. Each job it writes reports to a webhook as any job
does (the base spec's ``webhook``, else the bulk owner's default URL; its events name the bulk
run). Each row's output key is
``{output_prefix}/{bulk name}/{row id}.{ext}``: stable across runs, and the dataset export
(:func:`export_rows`) lists it with the row's parameters, seed, model hash and sha256.

:func:`submit_and_feed` is the whole submission, from a base spec file and a manifest file (or an
object in the store) to the first window fed: ``FarmClient.submit_bulk`` and the nightly
``farm.start_bulk`` task (with the worker's own database, store and Celery app) both call it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.bulk_manifest import ManifestRow, read_manifest, read_manifest_file
from farm.errors import NotFound, UserError
from farm.families import gpu_queue
from farm.feeder import feed
from farm.inputs import upload_inputs
from farm.job_spec import JobSpec, SpecError
from farm.kinds import DEFAULT_KIND, KINDS, job_kind
from farm.model_refs import is_registry_ref
from farm.model_registry import pin_spec_model
from farm.quotas import check_items
from farm.scheduler import job_row, owner_and_project, requeue_failed
from farm.settings import FarmSettings, SchedulingSettings, WebhooksSettings
from farm.spec_files import read_spec_file
from farm.specs import parse_spec
from farm.webhooks import attach_job_webhook
from storage.chunking import insert_rows
from storage.db import session_scope
from storage.models import Artifact, BulkJob, Job, Shard, utcnow
from storage.objects.keys import check_output_folder, join_key, validate_part, validate_prefix
from storage.status import JobStatus, ServiceClass, ShardStatus
from storage.webhook_outbox import record_status_event

if TYPE_CHECKING:
    from storage.objects import ObjectStore


def group_spec(base: dict[str, Any], row: ManifestRow) -> dict[str, Any]:
    """The job spec of a row's group: the base with the row's overrides; prompts and seeds come
    from each row's item, the ones here only satisfy the spec's shape."""
    spec = {**base, **row.overrides}
    spec.pop("idempotency_key", None)
    for name in ("seeds", "base_seed", "count"):
        spec.pop(name, None)
    spec["seeds"] = [row.seed]
    if row.prompt is not None:
        spec["prompts"] = [row.prompt]
    return spec


def pinned_rows(base: dict[str, Any], rows: list[ManifestRow], store: ObjectStore) -> list[ManifestRow]:
    """``rows`` with each ``registry:`` model override pinned to its exact manifest (resolved once
    per group), so every job of the bulk run names the bytes it renders with."""
    pinned: dict[str, str] = {}
    result = []
    for row in rows:
        model = row.overrides.get("model")
        if isinstance(model, str) and is_registry_ref(model):
            if row.group not in pinned:
                try:
                    pinned[row.group] = pin_spec_model(parse_spec(group_spec(base, row)), store).model
                except UserError as exc:
                    raise UserError(f"row {row.row_id} (line {row.line}): {exc}") from None
            row = dataclasses.replace(row, overrides={**row.overrides, "model": pinned[row.group]})
        result.append(row)
    return result


def check_bulk_kind(base: dict[str, Any]) -> None:
    kind = base.get("kind", DEFAULT_KIND)
    bulk_kinds = [name for name, known in KINDS.items() if known.bulk]  # image kinds: one output per row
    if kind not in bulk_kinds:
        raise UserError(f"bulk renders take {' or '.join(bulk_kinds)} base specs, not {kind}")
    if base.get("only_items") is not None:
        raise UserError("only_items: a bulk run's items are its manifest rows; remove it from the base spec")


def check_base(base: dict[str, Any]) -> JobSpec:
    """The bulk run's base spec (input images as uploaded references), validated."""
    check_bulk_kind(base)
    spec = parse_spec(base)
    if spec.after:
        raise SpecError([("after", "a bulk run's jobs cannot wait for other jobs; submit the bulk run after them")])
    if spec.post_steps:
        raise SpecError([("post_steps", "a bulk run's outputs are packaged by the run (farm bulk package); remove it")])
    return spec


def _base_hash(base: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()


def existing_row_ids(session: Session, bulk_id: uuid.UUID) -> set[str]:
    ids: set[str] = set()
    for params in session.scalars(select(Shard.params).join(Job, Job.id == Shard.job_id).where(Job.bulk_id == bulk_id)):
        ids.update(item["row_id"] for item in params.get("items", ()))
    return ids


def submit_bulk(
    session: Session,
    name: str,
    base: dict[str, Any],
    rows: list[ManifestRow],
    *,
    manifest_key: str | None = None,
    feed_until: datetime | None = None,
    owner_id: uuid.UUID | None = None,
    project_id: uuid.UUID | None = None,
    quotas: SchedulingSettings | None = None,
    webhooks: WebhooksSettings | None = None,
) -> dict[str, Any]:
    """Create the bulk job ``name`` (or extend it with the rows it lacks). Returns counts. A new
    bulk job is owned by ``owner_id`` in ``project_id`` (by default: ``admin`` in ``default``);
    the jobs it feeds are its owner's, in its project (also when someone else extends it). The
    new rows count towards the owner's daily item cap (``quotas``, :mod:`farm.quotas`). With
    ``webhooks``, each new job gets its webhook as a submitted job does (the base spec's, else
    the owner's default URL) and, created running, its ``job.started`` event."""
    name = validate_part(name, "name")
    base_spec = check_base(base)
    bulk = session.scalar(select(BulkJob).where(BulkJob.name == name).with_for_update())
    if bulk is None:
        owner, project = owner_and_project(session, owner_id, project_id)
        bulk = BulkJob(name=name, base_spec=base, manifest_keys=[], rows_total=0, owner_id=owner, project_id=project)
        session.add(bulk)
        session.flush()
    elif _base_hash(bulk.base_spec) != _base_hash(base):
        raise UserError(f"bulk job {name!r} exists with a different base spec; use a new name")
    known = existing_row_ids(session, bulk.id)
    new_rows = [r for r in rows if r.row_id not in known]
    if quotas is not None and new_rows:
        check_items(session, quotas, bulk.owner_id, len(new_rows), per_job=False)
    groups: dict[str, list[ManifestRow]] = {}
    for row in new_rows:
        groups.setdefault(row.group, []).append(row)
    jobs = shards = 0
    for members in groups.values():
        job, spec = _insert_group(session, bulk, base, base_spec, members)
        jobs += 1
        shards += job.shards_total
        if webhooks is not None and attach_job_webhook(session, job.id, spec, bulk.owner_id, webhooks):
            record_status_event(session, job.id, JobStatus.RUNNING)
    bulk.rows_total = len(known) + len(new_rows)
    if manifest_key:
        bulk.manifest_keys = [*bulk.manifest_keys, manifest_key]
    bulk.feed_until = feed_until
    bulk.updated_at = utcnow()
    return {
        "bulk_id": str(bulk.id),
        "name": name,
        "rows": len(rows),
        "new_rows": len(new_rows),
        "known_rows": len(rows) - len(new_rows),
        "jobs": jobs,
        "shards": shards,
    }


@dataclass(frozen=True)
class ManifestUpload:
    """A manifest's bytes as sent to the farm API, with the name of the file they came from (a
    ``.csv`` name is read as CSV, anything else as JSONL)."""

    data: bytes
    name: str


def submit_and_feed(
    app: Any,
    session_factory: Any,
    store: ObjectStore,
    settings: FarmSettings,
    name: str,
    base: Any,
    manifest: str | Path | ManifestUpload,
    *,
    feed_until: datetime | None = None,
    now: datetime | None = None,
    owner_id: uuid.UUID | None = None,
    project_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """Create or extend the bulk job ``name``: ``base`` (a spec dict or file) with the rows of
    ``manifest`` (a local JSONL/CSV file or one sent to the API, kept in ``store``; or
    ``store:<key>``); then top the
    windows up (:func:`farm.feeder.feed`, as of ``now``). Everything is checked before anything is
    stored. A new bulk job is ``owner_id``'s in ``project_id`` (:func:`submit_bulk`), its jobs
    in the bulk class (:mod:`farm.fair_share`); the items count towards the owner's daily quota
    (:func:`farm.quotas.check_items`). Returns
    counts, with ``fed``: how many shards were sent."""
    folder = Path.cwd()
    if isinstance(base, str | Path):
        folder = Path(base).parent
        base = read_spec_file(Path(base))
    source = manifest.name if isinstance(manifest, ManifestUpload) else str(manifest)
    upload = None
    if source.startswith("store:") and not isinstance(manifest, ManifestUpload):
        key = source.removeprefix("store:")
        data = store.get_bytes(key)
    else:
        data = manifest.data if isinstance(manifest, ManifestUpload) else read_manifest_file(manifest)
        digest = hashlib.sha256(data).hexdigest()
        suffix = ".csv" if source.lower().endswith(".csv") else ".jsonl"
        key = join_key("inputs", "bulk", validate_part(name, "name"), f"{digest}{suffix}")
        upload = "text/csv" if suffix == ".csv" else "application/jsonl"
    # Everything is checked before anything is stored: a refused bulk leaves no object behind
    # (upload_inputs validates a spec with input files before uploading them).
    rows = read_manifest(data, source)
    check_bulk_kind(base)

    def checked(spec: Any) -> Any:
        check_base(spec)
        return spec

    base = upload_inputs(base, store, folder, check=checked)
    base = {**base, "model": pin_spec_model(check_base(base), store).model}  # registry: one manifest for all rows
    rows = pinned_rows(base, rows, store)
    if upload is not None:
        store.put_bytes(key, data, content_type=upload)
    with session_scope(session_factory) as session:
        result = submit_bulk(
            session,
            name,
            base,
            rows,
            manifest_key=key,
            feed_until=feed_until,
            owner_id=owner_id,
            project_id=project_id,
            quotas=settings.scheduling,
            webhooks=settings.webhooks,
        )
    result["fed"] = feed(app, session_factory, settings, now=now)
    return result


def _insert_group(
    session: Session, bulk: BulkJob, base: dict[str, Any], base_spec: JobSpec, rows: list[ManifestRow]
) -> tuple[Job, JobSpec]:
    """The job of one group of rows, with its shards (PENDING); and its spec."""
    first = rows[0]
    try:
        spec = parse_spec(group_spec(base, first))
    except UserError as exc:
        raise UserError(f"row {first.row_id} (line {first.line}): {exc}") from None
    if spec.kind != base_spec.kind:
        raise UserError(f"row {first.row_id} (line {first.line}): kind cannot be overridden")
    ext = job_kind(spec.kind).ext
    prefix = validate_prefix(spec.output_prefix, "output_prefix")
    if not prefix:  # the bulk name is then the outputs' top-level folder
        check_output_folder(bulk.name, "name")
    job = job_row(
        spec,
        status=JobStatus.RUNNING,
        bulk_id=bulk.id,
        service_class=ServiceClass.BULK,
        owner_id=bulk.owner_id,
        project_id=bulk.project_id,
        started_at=utcnow(),
        items_total=len(rows),
    )
    session.add(job)
    session.flush()
    queue = gpu_queue(spec.family)
    values = []
    for index, chunk in enumerate(_chunks(rows, spec.shard_size)):
        items = []
        for row in chunk:
            key = join_key(prefix, bulk.name, validate_part(f"{row.row_id}.{ext}", "id"))
            item = {"index": row.line, "prompt_index": 0, "seed": row.seed, "key": key, "row_id": row.row_id}
            item["prompt"] = row.prompt if row.prompt is not None else spec.prompts[0]
            if row.negative_prompt is not None:
                item["negative_prompt"] = row.negative_prompt
            items.append(item)
        values.append(
            {
                "id": uuid.uuid4(),
                "job_id": job.id,
                "index": index,
                "queue": queue,
                "status": ShardStatus.PENDING,
                "params": {"items": items},
                "items_total": len(items),
            }
        )
    job.shards_total = insert_rows(session, Shard, values)
    return job, spec


def _chunks(rows: list[ManifestRow], size: int) -> Iterator[list[ManifestRow]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def get_bulk(session: Session, name: str) -> BulkJob:
    bulk = session.scalar(select(BulkJob).where(BulkJob.name == name))
    if bulk is None:
        raise NotFound(f"no bulk job {name!r}")
    return bulk


def bulk_status(session: Session, name: str) -> dict[str, Any]:
    """Rows done / failed / remaining per model family (and in all)."""
    bulk = get_bulk(session, name)
    rows = session.execute(
        select(Job.family, Shard.status, func.sum(Shard.items_total), func.sum(Shard.items_done))
        .join(Job, Job.id == Shard.job_id)
        .where(Job.bulk_id == bulk.id)
        .group_by(Job.family, Shard.status)
    ).all()
    families: dict[str, dict[str, int]] = {}
    for family, status, total, done in rows:
        entry = families.setdefault(family, {"rows": 0, "done": 0, "failed": 0, "remaining": 0})
        total, done = int(total or 0), int(done or 0)
        entry["rows"] += total
        entry["done"] += done
        if ShardStatus(status) in (ShardStatus.FAILED, ShardStatus.CANCELLED):
            entry["failed"] += total - done
        else:
            entry["remaining"] += total - done
    overall = {k: sum(f[k] for f in families.values()) for k in ("rows", "done", "failed", "remaining")}
    return {
        "name": bulk.name,
        "feed_until": bulk.feed_until.isoformat() if bulk.feed_until else None,
        "manifests": list(bulk.manifest_keys),
        "families": families,
        **overall,
    }


def retry_failed_rows(session: Session, name: str) -> int:
    """Failed shards of the bulk job back to PENDING (the feeder feeds them); returns how many."""
    bulk = get_bulk(session, name)
    jobs = session.scalars(
        select(Job.id)
        .join(Shard, Shard.job_id == Job.id)
        .where(Job.bulk_id == bulk.id, Shard.status == ShardStatus.FAILED)
        .distinct()
    ).all()
    return sum(requeue_failed(session, job_id) for job_id in jobs)


def export_rows(session: Session, name: str) -> Iterator[dict[str, Any]]:
    """The dataset: one record per rendered row (row id, params, seed, model hash, key, sha256)."""
    bulk = get_bulk(session, name)
    query = (
        select(Artifact)
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.bulk_id == bulk.id)
        .order_by(Artifact.key)
        .execution_options(yield_per=1000)
    )
    for a in session.scalars(query):
        params = dict(a.params or {})
        yield {
            "row_id": params.get("row_id"),
            "params": params,
            "seed": a.seed,
            "model_hash": a.model_hash,
            "key": a.key,
            "sha256": a.sha256,
        }
