"""Job templates: a saved spec that jobs are submitted from, with ``--set`` overrides.

A template is a full, valid spec (it is checked when saved with :func:`check_template`, exactly as
a submitted spec is, so a template that is saved can be submitted as it is), with its input
images already in the store and without an ``idempotency_key`` (a template is used many times;
give a key at use with ``--set idempotency_key=...``). At use, :func:`template_spec` applies the
overrides; the result is validated again as any submitted spec, so a bad override is refused
naming its field. The rows and who may do what: :mod:`storage.templates`.
:class:`TemplateMethods` is the direct client's side (:class:`farm.client.FarmClient` has them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from farm.inputs import upload_inputs
from farm.job_spec import JobSpec, SpecError
from farm.job_views import Submitted
from farm.spec_files import read_spec_file
from farm.spec_overrides import apply_overrides
from farm.specs import parse_spec
from storage.db import session_scope
from storage.identity import Principal, ensure_default_identity, principal_for
from storage.templates import delete_template, find_template, list_templates, save_template, template_data


def check_template(raw: Any) -> JobSpec:
    """The template's spec, validated as a submitted one; an ``idempotency_key`` is refused."""
    if isinstance(raw, dict) and raw.get("idempotency_key") is not None:
        reason = "a template is used many times: give a key when you submit (--set idempotency_key=KEY)"
        raise SpecError([("idempotency_key", reason)])
    return parse_spec(raw)


def template_spec(template: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A job's spec from a template's, with ``overrides`` (dotted paths) applied; not yet validated."""
    return apply_overrides(template, overrides or {})


class TemplateMethods:
    """The templates of :class:`farm.client.FarmClient` in the direct mode, acting as the admin
    (the control host). Needs the client's ``_sessions``, ``store``, ``_checked``, ``_local_model``
    and ``submit_parsed``."""

    _sessions: Any
    store: Any

    def _acting(self, session: Any) -> Principal:
        """Who the direct mode acts as: the admin (on the control host)."""
        admin, _ = ensure_default_identity(session)
        return principal_for(session, admin.name)

    def save_template(self, name: str, spec: Any, *, project: str | None = None) -> dict[str, Any]:
        """Save (or replace) the template ``name``: a full valid spec (a dict or a YAML/JSON file),
        checked as a submit checks it and its input files put in the store first; without an
        ``idempotency_key``. Into ``project`` (default: ``default``). Returns the template, and
        ``created``."""
        if isinstance(spec, str | Path):
            raw, base = read_spec_file(Path(spec)), Path(spec).parent
        else:
            raw, base = spec, Path.cwd()
        raw = upload_inputs(raw, self.store, base, check=self._checked_template)
        with session_scope(self._sessions) as session:
            template, created = save_template(session, self._acting(session), name, raw, project)
            return {**template_data(session, template), "created": created}

    def templates(self) -> list[dict[str, Any]]:
        """Every template, by project and name (without their specs)."""
        with session_scope(self._sessions) as session:
            return list_templates(session, self._acting(session))

    def template(self, name: str, *, project: str | None = None) -> dict[str, Any]:
        """The template ``name`` with its spec (in ``project`` when several projects have one)."""
        with session_scope(self._sessions) as session:
            return template_data(session, find_template(session, self._acting(session), name, project))

    def delete_template(self, name: str, *, project: str | None = None) -> dict[str, Any]:
        with session_scope(self._sessions) as session:
            template = delete_template(session, self._acting(session), name, project)
            return {"name": template.name, "deleted": True}

    def submit_template(
        self, name: str, overrides: dict[str, Any] | None = None, *, project: str | None = None
    ) -> Submitted:
        """``farm submit --template NAME --set ...``: a job from the template's spec with
        ``overrides``, validated again (a bad override is refused naming its field), in the
        template's project."""
        with session_scope(self._sessions) as session:
            template = find_template(session, self._acting(session), name, project)
            stored, project_id = dict(template.spec), template.project_id
        raw = template_spec(stored, overrides)
        spec = parse_spec(upload_inputs(raw, self.store, Path.cwd(), check=self._checked))  # type: ignore[attr-defined]
        return self.submit_parsed(spec, project_id=project_id)  # type: ignore[attr-defined]

    def _checked_template(self, raw: Any) -> Any:
        """A template's spec with its input references in place, checked before anything is stored."""
        check_template(raw)
        return self._local_model(raw)  # type: ignore[attr-defined]
