"""Job webhooks, the farm's side: which URL a new job reports to, how a delivery is signed, and
when a failed one is tried again.

A job reports to its spec's ``webhook`` (or ``webhook_url``), else to its owner's default URL
(``farm users set-webhook``, ``PUT /v1/me/webhook``); :func:`attach_job_webhook` fixes it at
submit. Every delivery carries ``X-Farm-Signature: sha256=<hex>``, the HMAC-SHA256 of
``f"{timestamp}.{body}"`` under the owner's secret, with the timestamp in ``X-Farm-Timestamp``
(:func:`signature`). The secret is stored as it is: the farm must be able to sign, which a hash
of it could not do. It is never logged, nor is a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from farm.job_spec import JobSpec, SpecError
from farm.settings import WebhooksSettings
from farm.webhook_urls import AddressRefused, check_webhook_url
from storage.webhook_outbox import attach_webhook, user_webhook

SIGNATURE_HEADER = "X-Farm-Signature"
TIMESTAMP_HEADER = "X-Farm-Timestamp"
EVENT_HEADER = "X-Farm-Event"
EVENT_ID_HEADER = "X-Farm-Event-Id"


def event_body(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed) for an event: compact JSON, keys sorted."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signature_matches(secret: str, timestamp: int | str, body: bytes, given: str) -> bool:
    """Whether ``given`` is the signature of ``body`` at ``timestamp`` (constant-time)."""
    return hmac.compare_digest(signature(secret, timestamp, body), given)


def checked_url(url: str, settings: WebhooksSettings, field: str) -> str:
    """``url`` if a webhook may use it: its form, and a literal address the farm sends to;
    :class:`SpecError` naming ``field`` otherwise (a host name is judged at each delivery)."""
    try:
        host = check_webhook_url(url).hostname or ""
        settings.policy.check_literal(host)
    except (AddressRefused, ValueError) as exc:
        raise SpecError([(field, str(exc))]) from None
    return url


def attach_job_webhook(
    session: Session, job_id: uuid.UUID, spec: JobSpec, owner_id: uuid.UUID, settings: WebhooksSettings
) -> str | None:
    """Give a new job its webhook: the spec's, else its owner's default URL; none when webhooks
    are off or neither names one. Refused (:class:`SpecError`) for an address the farm does not
    send to, or an owner without a signing secret yet. Returns the URL."""
    if not settings.enabled:
        return None
    target = spec.webhook_target()
    default_url, has_secret = user_webhook(session, owner_id)
    field = "webhook_url" if spec.webhook_url is not None else "webhook.url"
    if target is None:
        if default_url is None:
            return None
        url, events, field = default_url, [], "webhook (your default URL)"
    else:
        url, events = target.url, list(target.events or [])
    checked_url(url, settings, field)
    if not has_secret:
        raise SpecError(
            [
                (
                    field,
                    "your user has no webhook signing secret yet: make one with `farm users webhook-secret USER` "
                    "or POST /v1/me/webhook-secret, then submit again",
                )
            ]
        )
    attach_webhook(session, job_id, url, events, settings.progress_interval_s)
    return url


def retry_at(attempt: int, created_at: datetime, now: datetime, settings: WebhooksSettings) -> datetime | None:
    """When to try an event again after its ``attempt``-th delivery failed: exponential backoff
    (``backoff_base_s`` doubling, at most ``backoff_max_s``) with jitter (half of the wait is
    random), or None when it is dead (``max_attempts`` made, or ``max_age_s`` passed)."""
    if attempt >= settings.max_attempts:
        return None
    wait = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (attempt - 1))
    wait = wait / 2 + random.uniform(0, wait / 2)  # noqa: S311 - jitter, not a secret
    at = now + timedelta(seconds=wait)
    if at - created_at > timedelta(seconds=settings.max_age_s):
        return None
    return at
