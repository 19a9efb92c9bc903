"""The Python client: submit jobs, watch them, cancel or retry them, fetch their results.

``FarmClient(settings)`` needs no torch: it writes job rows, publishes messages and reads state.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, select

from farm.api_client import ApiClient
from farm.bulk import bulk_status, export_rows, retry_failed_rows, submit_and_feed
from farm.celery_app import create_app
from farm.demand import queue_demands
from farm.dispatch import publish_finalize, publish_schedule
from farm.errors import JobNotScheduled, NotFound, UserError
from farm.feeder import feed
from farm.finalizer import finalize
from farm.inputs import upload_inputs
from farm.job_refs import resolve_job_id, short_id
from farm.job_spec import LOCAL_PATH_PREFIXES
from farm.job_views import ProgressCallback, Submitted, settled, shard_limit
from farm.model_registry import pin_spec_model
from farm.outages import ride_out, unavailable_service
from farm.reconciler import Reconciler
from farm.reruns import RerunPlan, plan_rerun
from farm.scheduler import SUMMARY_SHARDS, job_summary, requeue_failed, submit_job
from farm.settings import FarmSettings, load_settings
from farm.spec_files import read_spec_file
from farm.specs import parse_spec
from farm.templates import TemplateMethods
from farm.waiting import why_waiting
from storage.db import make_engine, make_session_factory, session_scope
from storage.dependencies import dependents, upstreams
from storage.models import Artifact, Job
from storage.objects import open_store
from storage.objects.keys import contact_sheet_key, manifest_key
from storage.recovery import unfinished_shard
from storage.registry import list_workers
from storage.status import JOB_TERMINAL, JobStatus
from storage.transitions import cancel_unstarted_shards, set_job_class, set_job_priority, set_job_status
from storage.webhook_outbox import job_deliveries


class FarmClient(TemplateMethods):
    """A connection to one farm: directly to its database, broker and object store (the control
    host, the farm's own services), or, with ``api.url`` and ``api.token`` set, through the farm
    API (:class:`farm.api_client.ApiClient`, the same methods and results) unless ``direct``."""

    def __new__(cls, settings: FarmSettings | None = None, *, direct: bool = False) -> Any:
        if cls is FarmClient and not direct:
            settings = settings or load_settings()
            if settings.api.client_mode:
                return ApiClient(settings)
        return super().__new__(cls)

    def __init__(self, settings: FarmSettings | None = None, *, direct: bool = False) -> None:
        self.settings = settings or load_settings()
        self._engine = make_engine(self.settings.database_url, pool_size=self.settings.db.pool_size)
        self._sessions = make_session_factory(self._engine)
        self._app = None
        self._store = None

    # -- resources ------------------------------------------------------------------------------
    @property
    def app(self):
        if self._app is None:
            self._app = create_app(self.settings)
        return self._app

    @property
    def sessions(self) -> Any:
        """The session factory of the farm's database (the API server's routes use it)."""
        return self._sessions

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.settings.storage, self.settings.data_dir)
        return self._store

    def close(self) -> None:
        self._engine.dispose()
        if self._app is not None:
            self._app.close()

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, spec: Any) -> uuid.UUID:
        """Validate and submit a job (a spec object, a dict, or a YAML/JSON file path). With an
        idempotency key, resubmitting returns the existing job's id.

        Input images given as ``{"path": ...}`` (relative to the spec file, or to the current
        folder for a dict) are checked and uploaded to the object store first."""
        return self.submit_job(spec).job_id

    def submit_job(self, spec: Any) -> Submitted:
        """:meth:`submit`, also saying whether the job is new or was already submitted under its
        ``idempotency_key`` (then nothing is submitted again)."""
        if isinstance(spec, str | Path):
            path = Path(spec)
            raw = read_spec_file(path)
            spec = parse_spec(upload_inputs(raw, self.store, path.parent, check=self._checked))
        elif isinstance(spec, dict):
            spec = parse_spec(upload_inputs(spec, self.store, Path.cwd(), check=self._checked))
        else:
            spec = self.with_local_model(spec)
        return self.submit_parsed(spec)

    def with_local_model(self, spec: Any) -> Any:
        """A parsed spec with its model path checked the way :meth:`submit` checks it (in the
        embedded mode, a local folder must be a diffusers model on this machine; made absolute)."""
        return spec.model_copy(update={"model": self._local_model({"model": spec.model})["model"]})

    def submit_parsed(
        self,
        spec: Any,
        *,
        owner_id: uuid.UUID | None = None,
        project_id: uuid.UUID | None = None,
        parent_job_id: uuid.UUID | None = None,
        scope: Any = None,
    ) -> Submitted:
        """Record a parsed, checked spec (inputs already in the store) as a job of ``owner_id`` in
        ``project_id`` (default: the admin, project ``default``) and send its scheduling message.
        A ``registry:`` model is pinned to its exact manifest (every shard loads the same bytes), a
        step's once it has its model from its source (:func:`farm.scheduler.submit_job`).
        ``parent_job_id``: the job this one re-runs. ``scope`` (a condition on ``job``: the
        submitter's, :func:`storage.access.job_scope`) limits the jobs its ``after`` may name by id;
        ``None``: every job (the admin on the control host)."""
        with session_scope(self._sessions) as session:
            job, created = submit_job(
                session,
                spec,
                owner_id=owner_id,
                project_id=project_id,
                quotas=self.settings.scheduling,
                webhooks=self.settings.webhooks,
                parent_job_id=parent_job_id,
                scope=scope,
                pin=lambda given: pin_spec_model(given, self.store),
            )
            job_id, status = job.id, JobStatus(job.status)
            made = dependents(session, job_id) if created and spec.post_steps else []  # its post-steps
            steps = [uuid.UUID(d["id"]) for d in made if d["status"] == JobStatus.PENDING.value]
        for pending in (job_id, *steps) if status == JobStatus.PENDING else steps:
            self._publish_schedule(pending)  # a post-step is split at once; its shards wait for the job
        return Submitted(job_id, created, status.value)

    # -- re-runs and templates -----------------------------------------------------------------
    def rerun(
        self, job_id: str | uuid.UUID, only_failed: bool = False, overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``farm rerun``: a new job from the stored spec of ``job_id`` with ``overrides`` (dotted
        paths, :mod:`farm.spec_overrides`), only the items it did not render when ``only_failed``
        (:mod:`farm.reruns`); validated as any submit. In the direct mode the re-run is the
        parent's owner's, in its project. Returns the new job's id, its parent, its items."""
        parent = self.job_id(job_id)
        with session_scope(self._sessions) as session:
            plan = plan_rerun(session, parent, only_failed=only_failed, overrides=overrides)
        spec = plan.check(parse_spec(upload_inputs(plan.raw, self.store, Path.cwd(), check=self._checked)))
        return self.submit_rerun(plan, spec, owner_id=plan.owner_id, project_id=plan.project_id)

    def submit_rerun(self, plan: RerunPlan, spec: Any, *, owner_id: uuid.UUID, project_id: uuid.UUID) -> dict[str, Any]:
        """Submit a planned re-run's checked spec (the API server's route checks it its own way)."""
        done = self.submit_parsed(spec, owner_id=owner_id, project_id=project_id, parent_job_id=plan.parent_id)
        return {
            "job_id": str(done.job_id),
            "parent_job_id": str(plan.parent_id),
            "created": done.created,
            "status": done.status,
            "items_total": spec.item_count(),
            "only_failed": bool(plan.failed),
        }

    def _checked(self, raw: Any) -> Any:
        """A spec with its input references in place, before any input is uploaded: valid as a
        whole, then its model path checked (:meth:`_local_model`)."""
        parse_spec(raw)
        return self._local_model(raw)

    def _local_model(self, raw: dict[str, Any]) -> dict[str, Any]:
        """In the embedded mode the workers run on this machine: a local model path (``raw``'s
        ``model``) is checked before anything is stored and made absolute, so a worker started in
        another folder finds it. Elsewhere a model path is each worker's own (its host, its working
        folder) and is left as written."""
        model = raw.get("model") if isinstance(raw, dict) else None
        if not self.settings.embedded or not isinstance(model, str):
            return raw
        if not (model.startswith(LOCAL_PATH_PREFIXES) or model in ("~", ".")):
            return raw
        path = Path(model).expanduser()
        resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if not (resolved / "model_index.json").is_file():
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            found = "is not a diffusers model folder (no model_index.json)" if resolved.is_dir() else "does not exist"
            raise UserError(f"model: {model!r}{where} {found} on this machine: {resolved}")
        return raw if str(resolved) == model else {**raw, "model": str(resolved)}

    def _publish_schedule(self, job_id: uuid.UUID) -> None:
        """Send the job's scheduling message; with the broker down, say that the job is kept and
        who will schedule it (the reconciler) instead of failing with a broker traceback."""

        try:
            publish_schedule(self.app, job_id)
        except Exception as exc:
            if unavailable_service(exc) != "broker":
                raise
            wait = self.settings.reconcile.stuck_after_s
            raise JobNotScheduled(
                f"job {job_id} is recorded but not scheduled yet: the broker is unreachable "
                f"({type(exc).__name__}); the farm's reconciler schedules it within {wait:g}s of the broker "
                f"coming back (`farm status {job_id}` shows it)",
                job_id=job_id,
            ) from None

    def job_id(self, ref: str | uuid.UUID) -> uuid.UUID:
        """The id of the job ``ref`` names: its whole id or a unique prefix (``farm status`` prints 8
        characters). Ambiguous or unknown prefixes are refused with what they matched."""
        with session_scope(self._sessions) as session:
            return resolve_job_id(session, ref)

    def get(
        self, job_id: str | uuid.UUID, shards: int | str = SUMMARY_SHARDS, scope: ColumnElement[bool] | None = None
    ) -> dict[str, Any]:
        """The job with its counts by shard status and at most ``shards`` of its shards (failed,
        running, most recently changed; all of them when it has no more); ``shards="all"``
        lists every shard. ``after`` lists the jobs it waits for (id, name, status, mode, policy),
        ``then`` the jobs that wait for it; ``waiting`` says, in words, why work of a job that is
        not moving waits (an upstream job not done yet, no live worker on its queue, every one
        busy, nobody to schedule it, a cap reached). ``scope``: the jobs the viewer may open
        (:func:`storage.access.job_scope`; ``None``: every job); a linked job outside it shows
        only its status (``hidden``), without id, name or kind."""
        limit = shard_limit(shards)
        with session_scope(self._sessions) as session:
            job = resolve_job_id(session, job_id)
            summary = job_summary(session, job, shard_limit=limit)
            summary["after"] = upstreams(session, job, scope)
            summary["then"] = dependents(session, job, scope)
            summary["waiting"] = why_waiting(session, job, self.settings, scope=scope)
            return summary

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest jobs with their counts (no shards listed)."""
        with session_scope(self._sessions) as session:
            ids = session.scalars(select(Job.id).order_by(Job.created_at.desc()).limit(limit)).all()
            return [job_summary(session, i, shard_limit=0) for i in ids]

    def wait(
        self,
        job_id: str | uuid.UUID,
        timeout: float | None = None,
        poll: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Block until the job is final; returns its summary. Raises ``TimeoutError``. A database
        restart while waiting is waited out (within ``timeout``)."""

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = self.settings.worker.service_wait_s if deadline is None else max(0.0, deadline - time.monotonic())
            summary = ride_out(lambda: self.get(job_id), what=f"job {job_id}", wait_s=left)
            if on_progress is not None:
                on_progress(summary)
            if JobStatus(summary["status"]) in JOB_TERMINAL and settled(summary):
                return summary
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {summary['status']} after {timeout:.0f}s")
            time.sleep(poll)

    def cancel(self, job_id: str | uuid.UUID) -> dict[str, Any]:
        """Cancel a job: pending shards are cancelled now, running ones stop at their next step.
        The summary's ``cancel`` says what happened, in words: ``cancelled``, ``already <status>``
        for a job that had ended, or ``finishing`` for a job whose every shard had already ended
        (it keeps the status its shards give it: a cancel never spoils a finished render)."""
        job = self.job_id(job_id)
        with session_scope(self._sessions) as session:
            status = JobStatus(session.scalar(select(Job.status).where(Job.id == job).with_for_update()))
            unfinished = session.scalar(select(unfinished_shard(job)))
            if status in JOB_TERMINAL:
                outcome = f"already {status.value}"
            elif status == JobStatus.RUNNING and not unfinished:
                outcome = "finishing"  # every shard ended: the finalizer gives the job its status
            else:
                set_job_status(session, job, JobStatus.CANCELLED, error="cancelled by request")
                cancel_unstarted_shards(session, job)
                outcome = "cancelled"
        if outcome == "finishing":
            finalize(self._sessions, self.store, job)
        elif outcome == "cancelled":
            publish_finalize(self.app, job)
        return {**self.get(job), "cancel": outcome}

    def set_priority(self, job_id: str | uuid.UUID, priority: int) -> dict[str, Any]:
        """Change a job's priority (0-9): the shards it sends from now on carry it (messages
        already queued keep theirs). Returns the job's summary."""
        job = self.job_id(job_id)
        with session_scope(self._sessions) as session:
            set_job_priority(session, job, priority)
        return self.get(job, shards=0)

    def set_class(self, job_id: str | uuid.UUID, service_class: str) -> dict[str, Any]:
        """Move a job to the ``interactive`` or ``bulk`` class (the feeder sends interactive
        shards first and may preempt bulk ones for them). Returns the job's summary."""
        job = self.job_id(job_id)
        with session_scope(self._sessions) as session:
            set_job_class(session, job, service_class)
        return self.get(job, shards=0)

    def retry(self, job_id: str | uuid.UUID) -> dict[str, Any]:
        """``farm retry``: re-queue the job's failed shards and send its stuck ones again. Returns
        ``requeued``, ``resent`` and ``note``: what was done, or why nothing was (a cancelled job
        is not retried: submit it again; a job with nothing failed or stuck has nothing to do)."""
        job = self.job_id(job_id)
        with session_scope(self._sessions) as session:
            status = JobStatus(session.scalar(select(Job.status).where(Job.id == job)))
        if status == JobStatus.CANCELLED:
            note = f"job {short_id(job)} was cancelled: nothing re-queued (submit its spec again to render it)"
            return {"job_id": str(job), "requeued": 0, "resent": 0, "note": note}
        requeued = self.retry_failed(job)
        resent = self.resend_stuck(job)
        if requeued or resent:
            note = f"re-queued {requeued} failed shard(s), re-sent {resent} stuck shard(s) of job {short_id(job)}"
        else:
            note = f"nothing to retry: job {short_id(job)} is {status.value} with no failed or stuck shards"
        return {"job_id": str(job), "requeued": requeued, "resent": resent, "note": note}

    def retry_failed(self, job_id: str | uuid.UUID) -> int:
        """Put the job's failed shards back, for the feeder to send in their turn; returns how
        many. ``farm retry`` also calls :meth:`resend_stuck`."""
        with session_scope(self._sessions) as session:
            count = requeue_failed(session, resolve_job_id(session, job_id))
        if count:
            self.feed_bulk()
        return count

    def resend_stuck(self, job_id: str | uuid.UUID) -> int:
        """Send again, now, every shard of the job that waits for a worker on a queue someone
        consumes, or whose lease expired: a lost message never leaves a job waiting for good.
        Returns how many messages were sent (a duplicate is harmless: the lease turns it away)."""

        report = Reconciler(self.settings, self._sessions, self.app, self.store).resend_job(self.job_id(job_id))
        return report.resent_waiting + report.resent_orphaned

    # -- bulk -----------------------------------------------------------------------------------
    def submit_bulk(
        self,
        name: str,
        base: Any,
        manifest: str | Path,
        *,
        feed_until: datetime | None = None,
        now: datetime | None = None,
        owner_id: uuid.UUID | None = None,
        project_id: uuid.UUID | None = None,
    ) -> dict[str, Any]:
        """Create or extend the bulk job ``name``: ``base`` (a spec dict or file) with the rows of
        ``manifest`` (a local JSONL/CSV file, or ``store:<key>``). Only rows it does not have yet
        are added; then the windows are topped up. Returns counts. A new bulk job is
        ``owner_id``'s in ``project_id`` (default: the admin, project ``default``)."""

        return submit_and_feed(
            self.app,
            self._sessions,
            self.store,
            self.settings,
            name,
            base,
            manifest,
            feed_until=feed_until,
            now=now,
            owner_id=owner_id,
            project_id=project_id,
        )

    def feed_bulk(self, now: datetime | None = None) -> int:
        """Top every queue's window up (as of ``now``); returns how many shards were sent."""

        return feed(self.app, self._sessions, self.settings, now=now)

    def bulk_status(self, name: str) -> dict[str, Any]:

        with session_scope(self._sessions) as session:
            return bulk_status(session, name)

    def retry_bulk(self, name: str) -> int:
        """Feed a bulk job's failed rows again; returns how many shards."""

        with session_scope(self._sessions) as session:
            count = retry_failed_rows(session, name)
        self.feed_bulk()
        return count

    def export_bulk(self, name: str, out: Path) -> int:
        """Write the dataset export (JSONL) of a bulk job; returns the number of rows."""

        n = 0
        with session_scope(self._sessions) as session, Path(out).open("w", encoding="utf-8") as f:
            for record in export_rows(session, name):
                f.write(json.dumps(record, sort_keys=True) + "\n")
                n += 1
        return n

    def webhook_deliveries(self, job_id: str | uuid.UUID) -> list[dict[str, Any]]:
        """The job's webhook events, in order, with how each one's delivery goes."""
        with session_scope(self._sessions) as session:
            return job_deliveries(session, resolve_job_id(session, job_id))

    def previews(
        self, job_id: str | uuid.UUID, download: Path | None = None, url: Callable[[str], str] | None = None
    ) -> dict[str, Any]:
        """URLs a person looks at first: the contact sheet and the manifest (written once every
        shard has ended), and each video clip's GIF preview. With ``download``, the contact sheet
        and the manifest are saved there too (``contact_sheet_path``, ``manifest_path``).
        ``url``: how an object key becomes a URL (default: the store's own, presigned for S3)."""
        job = self.job_id(job_id)
        link = url or self.store.url
        with session_scope(self._sessions) as session:
            prefix = session.scalar(select(Job.output_prefix).where(Job.id == job))
            if prefix is None:
                raise NotFound(f"no job {job_id}")
            gifs = session.scalars(
                select(Artifact.key)
                .where(Artifact.job_id == job, Artifact.content_type == "image/gif")
                .order_by(Artifact.item_index)
            ).all()
        found: dict[str, Any] = {}
        for name, key in (("contact_sheet", contact_sheet_key(prefix, job)), ("manifest", manifest_key(prefix, job))):
            there = self.store.exists(key)
            found[name] = link(key) if there else None
            if there and download is not None:
                found[f"{name}_path"] = str(self.store.download(key, Path(download) / key.rsplit("/", 1)[-1]))
        return {**found, "gif_previews": [link(key) for key in gifs]}

    # -- workers --------------------------------------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        """Registered workers (newest first) with status, queues, device, pinned models, current
        shard and last heartbeat; silent ones are shown lost."""
        with session_scope(self._sessions) as session:
            return list_workers(session, self.settings.worker.lost_after_s)

    def queues(self) -> list[dict[str, Any]]:
        """Each GPU queue's demand: shards pending, queued and running, items left, the oldest
        waiting shard's age, measured speeds, live and desired workers (:mod:`farm.demand`)."""
        with session_scope(self._sessions) as session:
            return [d.as_dict() for d in queue_demands(session, self.settings)]

    def results(
        self, job_id: str | uuid.UUID, download: Path | None = None, url: Callable[[str], str] | None = None
    ) -> list[dict[str, Any]]:
        """The job's artifacts with URLs (presigned for S3; ``url`` overrides how a key becomes
        one); with ``download``, files are saved there too (``path`` added)."""
        job = self.job_id(job_id)
        link = url or self.store.url
        with session_scope(self._sessions) as session:
            rows = session.scalars(
                select(Artifact).where(Artifact.job_id == job).order_by(Artifact.item_index, Artifact.key)
            ).all()
            kind = session.scalar(select(Job.kind).where(Job.id == job))
            artifacts = [
                {
                    "key": a.key,
                    "item_index": a.item_index,
                    "kind": kind,
                    "prompt": (a.params or {}).get("prompt"),
                    "seed": a.seed,
                    "frame": frame if isinstance(frame := (a.params or {}).get("frame"), int) else None,
                    "sha256": a.sha256,
                    "size": a.size_bytes,
                    "content_type": a.content_type,
                }
                for a in rows
            ]
        for artifact in artifacts:
            artifact["url"] = link(artifact["key"])
            if download is not None:
                target = Path(download) / artifact["key"].rsplit("/", 2)[-2] / artifact["key"].rsplit("/", 1)[-1]
                artifact["path"] = str(self.store.download(artifact["key"], target))
        return artifacts
