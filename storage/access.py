"""Who may do what: the one place that decides. Pure functions of a :class:`Principal` and SQL
clauses; no HTTP, no sessions.

- An **admin** sees and changes everything, may submit into any project and at any priority.
- A **member** sees the jobs of their projects; changes their own jobs in their projects, and any
  job of a project they manage; submits into their projects up to the member priority cap.
- A **viewer** sees the jobs of their projects and changes nothing.
- A job is **re-run** (a new job from its spec, the caller's own, in the job's project) by whoever
  may submit into that project: admins, and members of it.
- **Templates** follow their project as jobs do: its members see and use them; their owner, the
  project's managers and admins change them.

Read access and change access follow the job's project as it is now: a member removed from a
project no longer sees or changes its jobs, their own included.
"""

from __future__ import annotations

import uuid

from sqlalchemy import ColumnElement, false, true

from storage.errors import Forbidden, UserError
from storage.identity import DEFAULT_PROJECT, Principal
from storage.models import BulkJob, Job, JobTemplate


def _scope(principal: Principal, column: ColumnElement[uuid.UUID]) -> ColumnElement[bool]:
    if principal.is_admin:
        return true()
    if not principal.projects:
        return false()
    return column.in_(list(principal.projects))


def job_scope(principal: Principal) -> ColumnElement[bool]:
    """A WHERE clause on ``job``: the jobs the principal may see."""
    return _scope(principal, Job.project_id)


def bulk_scope(principal: Principal) -> ColumnElement[bool]:
    """A WHERE clause on ``bulk_job``: the bulk jobs the principal may see."""
    return _scope(principal, BulkJob.project_id)


def template_scope(principal: Principal) -> ColumnElement[bool]:
    """A WHERE clause on ``job_template``: the templates the principal may see and use."""
    return _scope(principal, JobTemplate.project_id)


def can_read(principal: Principal, owner_id: uuid.UUID, project_id: uuid.UUID) -> bool:
    """Whether the principal may see a job (or bulk job) of this owner in this project."""
    return principal.is_admin or principal.member_of(project_id)


def can_change(principal: Principal, owner_id: uuid.UUID, project_id: uuid.UUID) -> bool:
    """Whether the principal may cancel, retry or otherwise change a job of this owner in this
    project: admins always, viewers never, members their own jobs in their projects and every
    job of a project they manage."""
    if principal.is_admin:
        return True
    if principal.is_viewer or not principal.member_of(project_id):
        return False
    return owner_id == principal.user_id or principal.manages(project_id)


def can_rerun(principal: Principal, project_id: uuid.UUID) -> bool:
    """Whether the principal may re-run a job of this project (a submit into it)."""
    return not principal.is_viewer and (principal.is_admin or principal.member_of(project_id))


def check_rerun(principal: Principal, project_id: uuid.UUID) -> None:
    """A re-run is a submit into the job's project: refused to viewers and to non-members."""
    if principal.is_viewer:
        raise Forbidden("viewers may not re-run jobs")
    if not (principal.is_admin or principal.member_of(project_id)):
        raise Forbidden("you may re-run only jobs of your projects")


def submit_project(principal: Principal, project_name: str | None) -> uuid.UUID:
    """The project a submit goes into: the one named (one of the principal's; any existing one
    for an admin), or without a name the principal's only project (``default`` for an admin)."""
    if principal.is_viewer:
        raise Forbidden("viewers may not submit jobs")
    if project_name is not None:
        project_id = principal.project_ids_by_name.get(project_name)
        if project_id is not None:
            return project_id
        if principal.is_admin:
            raise UserError(f"no project {project_name[:64]!r}")
        raise Forbidden(f"you are not a member of project {project_name[:64]!r}")
    if principal.is_admin:
        project_id = principal.project_ids_by_name.get(DEFAULT_PROJECT)
        if project_id is None:
            raise UserError(f"no project given and there is no {DEFAULT_PROJECT!r} project; name one")
        return project_id
    names = sorted(principal.project_ids_by_name)
    if not names:
        raise Forbidden("you are not a member of any project; ask an admin to add you to one")
    if len(names) > 1:
        raise UserError(f"you are in several projects ({', '.join(names[:10])}); name the one to submit into")
    return principal.project_ids_by_name[names[0]]


def check_class_change(principal: Principal) -> None:
    """Only an admin moves a job between the interactive and bulk classes (it decides what goes
    first on every queue)."""
    if not principal.is_admin:
        raise Forbidden(f"only an admin may change a job's service class, not a {principal.role}")


def check_priority(principal: Principal, priority: int, member_cap: int) -> None:
    """Refuse a priority above ``member_cap`` unless the principal is an admin."""
    if priority > member_cap and not principal.is_admin:
        raise Forbidden(f"priority {priority} is above {member_cap}, the most a {principal.role} may set")
