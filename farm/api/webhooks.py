"""Webhooks through the API: your default URL (``PUT /v1/me/webhook``), your signing secret
(``POST /v1/me/webhook-secret``, shown once) and a job's deliveries (``GET
/v1/jobs/{ref}/webhooks``, within your scope like every job route)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from farm.api.auth import caller
from farm.api.jobs import JobRef, audited, job_of
from farm.api.state import ApiState, api_state
from farm.webhook_urls import MAX_URL_CHARS
from farm.webhooks import checked_url
from storage.db import session_scope
from storage.identity import Principal
from storage.webhook_outbox import rotate_webhook_secret, set_user_webhook_url, user_webhook

router = APIRouter(prefix="/v1", tags=["webhooks"])
Caller = Annotated[Principal, Depends(caller)]
State = Annotated[ApiState, Depends(api_state)]


class WebhookUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(max_length=MAX_URL_CHARS, description="Where your jobs' events go; null: nowhere.")


@router.get("/me/webhook", summary="Your default webhook URL, and whether you have a signing secret")
def get_webhook(who: Caller, state: State) -> dict[str, Any]:
    with session_scope(state.sessions) as session:
        url, has_secret = user_webhook(session, who.user_id)
    return {"url": url, "has_secret": has_secret}


@router.put("/me/webhook", summary="Set your default webhook URL (for jobs whose spec names none)")
def put_webhook(body: WebhookUrl, request: Request, who: Caller, state: State) -> dict[str, Any]:
    with audited(state, request, who, "webhook.set", who.name) as note:
        url = checked_url(body.url, state.settings.webhooks, "url") if body.url is not None else None
        with session_scope(state.sessions) as session:
            made = set_user_webhook_url(session, who.user_id, url)
        note["detail"] = {"url": url, "secret_made": made is not None}
    answer: dict[str, Any] = {"url": url}
    if made is not None:
        answer["secret"] = made  # the first secret: shown this once
    return answer


@router.post("/me/webhook-secret", summary="Make a new webhook signing secret (shown once; the old one stops)")
def new_secret(request: Request, who: Caller, state: State) -> dict[str, Any]:
    with audited(state, request, who, "webhook.secret", who.name), session_scope(state.sessions) as session:
        secret = rotate_webhook_secret(session, who.user_id)
    return {"secret": secret}


@router.get("/jobs/{ref}/webhooks", summary="A job's webhook events and their deliveries")
def deliveries(ref: JobRef, who: Caller, state: State) -> list[dict[str, Any]]:
    job_id, _ = job_of(state, who, ref)
    return state.farm.webhook_deliveries(job_id)
