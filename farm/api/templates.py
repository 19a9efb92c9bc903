"""``/v1/templates``: saved job specs, listed, read, saved (created or replaced) and deleted.

A template belongs to a project: its members see and use it, its owner, the project's managers
and admins change it (:mod:`storage.access`, through :mod:`storage.templates`); another project's
template answers exactly as one that does not exist. A template is checked when saved as a
submitted spec is (:func:`farm.templates.check_template`: inputs already uploaded, no local
paths, no ``idempotency_key``). Submitting from a template is the client's: it reads the spec,
applies the overrides and submits (``POST /v1/jobs``), where the result is checked again.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from farm.api.auth import caller
from farm.api.jobs import audited, check_inputs_sent, refuse_local_paths
from farm.api.state import ApiState, api_state
from farm.templates import check_template
from storage.db import session_scope
from storage.identity import Principal
from storage.templates import delete_template, find_template, list_templates, save_template, template_data

router = APIRouter(prefix="/v1", tags=["templates"])
Caller = Annotated[Principal, Depends(caller)]
State = Annotated[ApiState, Depends(api_state)]
Name = Annotated[str, Path(min_length=1, max_length=64, description="The template's name.")]
ProjectName = Annotated[
    str | None, Query(max_length=64, description="The project, when several of yours have a template of this name.")
]


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(description="A full, valid job spec (inputs already uploaded), no idempotency_key.")
    project: str | None = Field(default=None, max_length=64, description="Default: your only project.")


@router.get("/templates", summary="The templates you may use")
def templates(who: Caller, state: State) -> list[dict[str, Any]]:
    with session_scope(state.sessions) as session:
        return list_templates(session, who)


@router.get("/templates/{name}", summary="A template with its spec")
def get_template(name: Name, who: Caller, state: State, project: ProjectName = None) -> dict[str, Any]:
    with session_scope(state.sessions) as session:
        return template_data(session, find_template(session, who, name, project))


@router.put("/templates/{name}", summary="Save a template (create it, or replace its spec)")
def put_template(
    name: Name, body: TemplateBody, request: Request, response: Response, who: Caller, state: State
) -> dict[str, Any]:
    with audited(state, request, who, "template.save", name) as note:
        refuse_local_paths(body.spec)
        check_template(body.spec)
        check_inputs_sent(state, body.spec)
        with session_scope(state.sessions) as session:
            template, created = save_template(session, who, name, body.spec, body.project)
            saved = {**template_data(session, template), "created": created}
        note.update(target=f"{saved['project']}/{name}", status=201 if created else 200)
    response.status_code = note["status"]
    return saved


@router.delete("/templates/{name}", summary="Delete a template")
def remove_template(
    name: Name, request: Request, who: Caller, state: State, project: ProjectName = None
) -> dict[str, Any]:
    with audited(state, request, who, "template.delete", name), session_scope(state.sessions) as session:
        template = delete_template(session, who, name, project)
        return {"name": template.name, "deleted": True}
