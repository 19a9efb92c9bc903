"""Saved job specs (``job_template``): named uniquely within a project, seen by the project's
members, changed by their owner, the project's managers and admins (:mod:`storage.access`).

The spec is stored as given; the farm validates it before it is saved and again when a job is
submitted from it (:mod:`farm.templates`). Every function takes the :class:`Principal` it acts
for (in direct mode: the admin) and the caller's session.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.access import can_change, submit_project, template_scope
from storage.errors import Forbidden, NotFound, UserError
from storage.identity import Principal, check_name
from storage.models import JobTemplate, Project, User, utcnow

MAX_LISTED = 500


def template_name(name: str) -> str:
    """A valid template name (as user and project names: 1-64 letters, digits, ``._-``)."""
    return check_name(name, "template name")


def find_template(session: Session, principal: Principal, name: str, project: str | None = None) -> JobTemplate:
    """The template ``name`` among those the principal sees: in ``project`` when given, else the
    only one of that name (several projects having one is refused, naming them)."""
    query = select(JobTemplate).where(JobTemplate.name == template_name(name), template_scope(principal))
    if project is not None:
        named = select(Project.id).where(Project.name == project).scalar_subquery()
        query = query.where(JobTemplate.project_id == named)
    found = session.scalars(query.limit(6)).all()
    if not found:
        where = f" in project {project[:64]!r}" if project is not None else ""
        raise NotFound(f"no template {name!r}{where}")
    if len(found) > 1:
        projects = sorted(session.scalars(select(Project.name).where(Project.id.in_([t.project_id for t in found]))))
        raise UserError(f"template {name!r} exists in projects {', '.join(projects)}: name the project (--project)")
    return found[0]


def save_template(
    session: Session, principal: Principal, name: str, spec: dict[str, Any], project: str | None = None
) -> tuple[JobTemplate, bool]:
    """Create the template ``name`` in ``project`` (the principal's submit project when not
    named), or replace its spec when it exists and the principal may change it. Returns the
    row and whether it is new."""
    if principal.is_viewer:
        raise Forbidden("viewers may not save templates")
    project_id = submit_project(principal, project)
    template = session.scalar(
        select(JobTemplate).where(JobTemplate.project_id == project_id, JobTemplate.name == template_name(name))
    )
    if template is None:
        template = JobTemplate(name=name, spec=spec, owner_id=principal.user_id, project_id=project_id)
        session.add(template)
        session.flush()
        return template, True
    _check_change(principal, template, "replace")
    template.spec = spec
    template.updated_at = utcnow()
    return template, False


def delete_template(session: Session, principal: Principal, name: str, project: str | None = None) -> JobTemplate:
    """Delete the template (found as :func:`find_template` finds it) when the principal may change it."""
    template = find_template(session, principal, name, project)
    _check_change(principal, template, "delete")
    session.delete(template)
    session.flush()
    return template


def _check_change(principal: Principal, template: JobTemplate, what: str) -> None:
    if not can_change(principal, template.owner_id, template.project_id):
        raise Forbidden(
            f"you may not {what} template {template.name!r}: it is not yours and you do not manage its project"
        )


def template_data(session: Session, template: JobTemplate, *, spec: bool = True) -> dict[str, Any]:
    """A template as plain data: name, project, owner, kind, times, and its spec unless ``spec`` is False."""
    owner, project = session.execute(
        select(
            select(User.name).where(User.id == template.owner_id).scalar_subquery(),
            select(Project.name).where(Project.id == template.project_id).scalar_subquery(),
        )
    ).one()
    data = {
        "name": template.name,
        "project": project,
        "owner": owner,
        "kind": (template.spec or {}).get("kind", "text_to_image"),
        "created_at": template.created_at.isoformat(),
        "updated_at": template.updated_at.isoformat(),
    }
    if spec:
        data["spec"] = template.spec
    return data


def list_templates(session: Session, principal: Principal) -> list[dict[str, Any]]:
    """The templates the principal sees, by project and name (without their specs)."""
    rows = session.scalars(
        select(JobTemplate)
        .join(Project, Project.id == JobTemplate.project_id)
        .where(template_scope(principal))
        .order_by(Project.name, JobTemplate.name)
        .limit(MAX_LISTED)
    ).all()
    return [template_data(session, row, spec=False) for row in rows]
