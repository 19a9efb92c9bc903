"""The client through the farm API: what :class:`~farm.client.FarmClient` becomes when
``api.url`` and ``api.token`` are set. Same methods, same results, same errors (the API sends
each error's type and message; they are raised here as the same classes), and it needs no
database, broker or bucket settings: a person holds a token and nothing more.

Input images named by ``{"path": ...}`` are checked here exactly as in the direct mode, the
spec is checked by the server with their references in place, and only then are the files sent
(``PUT /v1/inputs/{sha256}``): a refused spec uploads nothing.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from farm.bulk_manifest import read_manifest_file
from farm.errors import FarmError, Forbidden, InvalidTransition, NotFound, Unauthorized, UserError
from farm.inputs import pending_bytes, plan_uploads
from farm.job_spec import SpecError
from farm.job_views import ProgressCallback, Submitted, settled, shard_limit
from farm.scheduler import SUMMARY_SHARDS
from farm.settings import FarmSettings
from farm.spec_files import read_spec_file
from farm.templates import check_template, template_spec
from storage.status import JOB_TERMINAL, JobStatus

TIMEOUT_S = 60.0
ERRORS: dict[str, type[FarmError]] = {
    "NotFound": NotFound,
    "ObjectNotFound": NotFound,
    "Unauthorized": Unauthorized,
    "Forbidden": Forbidden,
    "InvalidTransition": InvalidTransition,
}


class ApiUnavailable(FarmError):
    """The farm API could not be reached or answered with a server error: try again later."""

    retryable = True


class RateLimited(FarmError):
    """Too many submissions from this token: the API said how long to wait."""

    retryable = True


def raise_for(response: httpx.Response) -> None:
    """Raise the error the API described, as the farm's own class (its message unchanged)."""
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    kind, message = error.get("type", ""), error.get("message") or f"the farm API answered {response.status_code}"
    if kind == "SpecError" or (response.status_code == 422 and error.get("problems") and kind == "RequestError"):
        raise SpecError([(p.get("field", ""), p.get("reason", "")) for p in error.get("problems") or []])
    if response.status_code == 429:
        raise RateLimited(f"{message} (retry after {response.headers.get('Retry-After', '?')} s)")
    if kind in ERRORS:
        raise ERRORS[kind](message)
    if response.status_code == 401:
        raise Unauthorized(message)
    if response.status_code == 403:
        raise Forbidden(message)
    if response.status_code == 404:
        raise NotFound(message)
    if response.status_code >= 500:
        raise ApiUnavailable(f"the farm API answered {response.status_code}: {message}")
    raise UserError(message)


class ApiClient:
    """A farm reached through its API (``settings.api.url`` with ``settings.api.token``)."""

    def __init__(self, settings: FarmSettings) -> None:
        if not settings.api.client_mode:
            raise UserError("api.url and api.token are both needed to reach the farm through its API")
        self.settings = settings
        self.url = str(settings.api.url).rstrip("/")
        token = settings.api.token.get_secret_value() if settings.api.token else ""
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_S, follow_redirects=False
        )

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"cannot reach the farm API at {self.url}: {type(exc).__name__}") from None
        raise_for(response)
        return response.json() if response.content else None

    # -- jobs ----------------------------------------------------------------------------------
    def submit(self, spec: Any, *, project: str | None = None) -> uuid.UUID:
        """Check a job, send its input files, submit it (see :meth:`FarmClient.submit`)."""
        return self.submit_job(spec, project=project).job_id

    def submit_job(self, spec: Any, *, project: str | None = None) -> Submitted:
        if isinstance(spec, str | Path):
            path = Path(spec)
            raw, base_dir = read_spec_file(path), path.parent
        elif isinstance(spec, dict):
            raw, base_dir = spec, Path.cwd()
        else:
            raw, base_dir = spec.model_dump(mode="json"), Path.cwd()
        raw, pending = plan_uploads(raw, base_dir)
        body = {"spec": raw, "project": project}
        self._call("POST", "/v1/specs/check", json=body)
        self._send_inputs(pending)
        done = self._call("POST", "/v1/jobs", json=body)
        return Submitted(uuid.UUID(done["job_id"]), done["created"], done["status"])

    def _send_inputs(self, pending: list[Any]) -> None:
        """Send checked local input files (``PUT /v1/inputs/{sha256}``; the server checks them again)."""
        for upload in pending:
            headers = {"Content-Type": upload.content_type}
            self._call("PUT", f"/v1/inputs/{upload.sha256}", content=pending_bytes(upload), headers=headers)

    def job_id(self, ref: str | uuid.UUID) -> uuid.UUID:
        return uuid.UUID(self._call("GET", f"/v1/jobs/{_ref(ref)}", params={"shards": "0"})["id"])

    def get(self, job_id: str | uuid.UUID, shards: int | str = SUMMARY_SHARDS) -> dict[str, Any]:
        limit = shard_limit(shards)
        return self._call("GET", f"/v1/jobs/{_ref(job_id)}", params={"shards": "all" if limit is None else str(limit)})

    def list_jobs(self, limit: int = 20, **filters: Any) -> list[dict[str, Any]]:
        """The latest jobs you may see (filters: status, kind, owner, project, q)."""
        params = {"limit": str(limit), **{k: v for k, v in filters.items() if v is not None}}
        return self._call("GET", "/v1/jobs", params=params)["jobs"]

    def wait(
        self,
        job_id: str | uuid.UUID,
        timeout: float | None = None,
        poll: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Block until the job is final; returns its summary. Raises ``TimeoutError``. The API
        being unreachable for a while is waited out (within ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        patience = self.settings.worker.service_wait_s
        unreachable_since: float | None = None
        while True:
            try:
                summary = self.get(job_id)
                unreachable_since = None
            except ApiUnavailable:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > patience:
                    raise
                summary = None
            if summary is not None:
                if on_progress is not None:
                    on_progress(summary)
                if JobStatus(summary["status"]) in JOB_TERMINAL and settled(summary):
                    return summary
            if deadline is not None and time.monotonic() > deadline:
                status = summary["status"] if summary else "unknown (the API is unreachable)"
                raise TimeoutError(f"job {job_id} is still {status} after {timeout:.0f}s")
            time.sleep(poll)

    def cancel(self, job_id: str | uuid.UUID) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{_ref(job_id)}/cancel")

    def retry(self, job_id: str | uuid.UUID) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{_ref(job_id)}/retry")

    def rerun(
        self, job_id: str | uuid.UUID, only_failed: bool = False, overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A new job from the job's stored spec (see :meth:`FarmClient.rerun`); yours, in its project."""
        body = {"only_failed": only_failed, "overrides": overrides or {}}
        return self._call("POST", f"/v1/jobs/{_ref(job_id)}/rerun", json=body)

    # -- templates -----------------------------------------------------------------------------
    def save_template(self, name: str, spec: Any, *, project: str | None = None) -> dict[str, Any]:
        """Check a template's spec (here, then by the server), send its input files, save it."""
        if isinstance(spec, str | Path):
            raw, base_dir = read_spec_file(Path(spec)), Path(spec).parent
        else:
            raw, base_dir = spec, Path.cwd()
        raw, pending = plan_uploads(raw, base_dir)
        check_template(raw)
        if pending:  # the server checks the spec before any file is sent
            self._call("POST", "/v1/specs/check", json={"spec": raw, "project": project})
            self._send_inputs(pending)
        body = {"spec": raw, "project": project}
        return self._call("PUT", f"/v1/templates/{_name(name, 'template name')}", json=body)

    def templates(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/templates")

    def template(self, name: str, *, project: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"/v1/templates/{_name(name, 'template name')}", params=_project(project))

    def delete_template(self, name: str, *, project: str | None = None) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/templates/{_name(name, 'template name')}", params=_project(project))

    def submit_template(
        self, name: str, overrides: dict[str, Any] | None = None, *, project: str | None = None
    ) -> Submitted:
        """A job from the template with ``overrides``, in the template's project (checked by the
        server as any submit)."""
        template = self.template(name, project=project)
        return self.submit_job(template_spec(template["spec"], overrides), project=template["project"])

    def set_priority(self, job_id: str | uuid.UUID, priority: int) -> dict[str, Any]:
        return self._call("PATCH", f"/v1/jobs/{_ref(job_id)}", json={"priority": priority})

    def set_class(self, job_id: str | uuid.UUID, service_class: str) -> dict[str, Any]:
        return self._call("PATCH", f"/v1/jobs/{_ref(job_id)}", json={"service_class": service_class})

    # -- outputs -------------------------------------------------------------------------------
    def results(self, job_id: str | uuid.UUID, download: Path | None = None) -> list[dict[str, Any]]:
        artifacts = self._call("GET", f"/v1/jobs/{_ref(job_id)}/results")
        if download is not None:
            for artifact in artifacts:
                key = artifact["key"]
                target = Path(download) / key.rsplit("/", 2)[-2] / key.rsplit("/", 1)[-1]
                artifact["path"] = str(self._download(artifact["url"], target))
        return artifacts

    def webhook_deliveries(self, job_id: str | uuid.UUID) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{_ref(job_id)}/webhooks")

    def previews(self, job_id: str | uuid.UUID, download: Path | None = None) -> dict[str, Any]:
        found = self._call("GET", f"/v1/jobs/{_ref(job_id)}/previews")
        if download is not None:
            for name in ("contact_sheet", "manifest"):
                if found.get(name):
                    target = Path(download) / found[name].rsplit("/", 1)[-1].split("?", 1)[0]
                    found[f"{name}_path"] = str(self._download(found[name], target))
        return found

    def _download(self, url: str, target: Path) -> Path:
        """Save an output: through the API (with the token) or from a presigned URL (without it:
        a presigned URL carries its own signature, and the token never goes to another host)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not url.startswith(self.url + "/"):
                return _fetch(url, target)
            response = self._http.send(self._http.build_request("GET", url), stream=True)
            if response.status_code == 307:  # an object in S3: fetched presigned, without the token
                location = response.headers.get("location", "")
                response.close()
                return _fetch(location, target)
            return _save(response, target)
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"cannot download {target.name}: {type(exc).__name__}") from None

    # -- workers and bulk ----------------------------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/workers")

    def queues(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/queues")

    def submit_bulk(
        self,
        name: str,
        base: Any,
        manifest: str | Path,
        *,
        feed_until: datetime | None = None,
        now: datetime | None = None,
        project: str | None = None,
    ) -> dict[str, Any]:
        """Create or extend the bulk job ``name`` (see :meth:`FarmClient.submit_bulk`): the base
        spec's input files are sent first, the manifest travels in the request. ``now`` is the
        server's own clock here."""
        if isinstance(base, str | Path):
            raw, base_dir = read_spec_file(Path(base)), Path(base).parent
        else:
            raw, base_dir = base, Path.cwd()
        source = str(manifest)
        if source.startswith("store:"):
            raise UserError("manifest: a store: manifest is for the control host; give a local JSONL or CSV file")
        text = read_manifest_file(manifest).decode("utf-8", errors="strict")
        raw, pending = plan_uploads(raw, base_dir, "base")
        self._send_inputs(pending)
        body = {
            "name": name,
            "base": raw,
            "manifest": text,
            "format": "csv" if source.lower().endswith(".csv") else "jsonl",
            "project": project,
            "feed_until": feed_until.isoformat() if feed_until else None,
        }
        return self._call("POST", "/v1/bulk", json=body)

    def bulk_status(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/bulk/{_name(name)}")

    def retry_bulk(self, name: str) -> int:
        return self._call("POST", f"/v1/bulk/{_name(name)}/retry")["requeued"]

    def export_bulk(self, name: str, out: Path) -> int:
        """Write the bulk job's dataset export (JSONL) to ``out``; returns the number of rows."""
        target = _save_stream(self._http, f"/v1/bulk/{_name(name)}/export", Path(out))
        with target.open("rb") as f:
            return sum(1 for line in f if line.strip())


def _fetch(url: str, target: Path) -> Path:
    with httpx.Client(timeout=TIMEOUT_S) as http, http.stream("GET", url) as response:
        return _save(response, target)


def _save(response: httpx.Response, target: Path) -> Path:
    """Write a streamed response to ``target`` (whole or not at all)."""
    try:
        if response.status_code >= 400:
            response.read()
            raise_for(response)
        partial = target.with_name(target.name + ".part")
        with partial.open("wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
        partial.replace(target)
    finally:
        response.close()
    return target


def _save_stream(http: httpx.Client, path: str, target: Path) -> Path:
    try:
        response = http.send(http.build_request("GET", path), stream=True)
    except httpx.TransportError as exc:
        raise ApiUnavailable(f"cannot reach the farm API: {type(exc).__name__}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    return _save(response, target)


def _name(name: str, what: str = "bulk name") -> str:
    """A bulk job's or template's name as a path segment (names are single path parts: no slashes)."""
    if not name or "/" in name or name in (".", "..") or len(name) > 128:
        raise UserError(f"{what} {name[:80]!r}: one path part of at most 128 characters")
    return quote(name, safe="")


def _project(project: str | None) -> dict[str, str]:
    return {} if project is None else {"project": project}


def _ref(ref: str | uuid.UUID) -> str:
    """A job reference as a path segment (nothing but hex digits and dashes gets through)."""
    text = str(ref).strip()
    if not text or any(c not in "0123456789abcdefABCDEF-" for c in text):
        raise UserError(f"job id {text[:80]!r}: give the whole id or at least its first 4 hex digits")
    return text
