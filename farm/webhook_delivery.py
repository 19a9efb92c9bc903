"""Delivering job webhooks from the outbox (:mod:`storage.webhook_outbox`): a pass claims the due
events (a round of ``webhooks.concurrency`` at a time), POSTs them in parallel threads, and
records how each went; :class:`WebhookLoop` runs passes in every worker
that consumes farm.control.

Outbound safety: the URL's host is resolved and every address judged (:mod:`farm.webhook_urls`)
at each attempt, and the request goes to the judged address itself (the ``Host`` header and, for
https, the TLS server name and certificate check keep the URL's host name), so a name that
resolves differently between the check and the connection reaches nothing new. Redirects are not
followed (a 3xx is a failed attempt); each attempt has ``webhooks.timeout_s``; at most
``webhooks.max_response_bytes`` of an answer are read; no proxy from the environment is used.
Logs name the event, the job and the host, never the secret or a signature.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlunsplit

import httpx

from farm import __version__
from farm.periodic import PeriodicThread
from farm.settings import WebhooksSettings
from farm.webhook_urls import AddressPolicy, AddressRefused, check_webhook_url
from farm.webhooks import (
    EVENT_HEADER,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    event_body,
    retry_at,
    signature,
)
from storage.db import session_scope
from storage.models import utcnow
from storage.webhook_outbox import ClaimedEvent, claim_due, mark_delivered, mark_failed

log = logging.getLogger(__name__)

SHOWN_ERROR_CHARS = 200


@dataclass(frozen=True)
class Attempt:
    """How one POST went: accepted (a 2xx), the HTTP status if one came, what went wrong."""

    accepted: bool
    http_status: int | None = None
    error: str | None = None


@dataclass
class DeliveryReport:
    """What one pass did."""

    delivered: int = 0
    failed: int = 0  # to be tried again
    dead: int = 0  # given up on
    lost: int = 0  # claimed again by another deliverer meanwhile (its lease ran out)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)[:SHOWN_ERROR_CHARS].strip()


def post_event(event: ClaimedEvent, settings: WebhooksSettings, policy: AddressPolicy) -> Attempt:
    """POST one event to its URL, signed with ``event.secret``, at the address its host resolves
    to if that address is allowed."""
    if event.secret is None:
        return Attempt(False, error="the job's owner has no webhook signing secret")
    try:
        parts = check_webhook_url(event.url)
        host = parts.hostname or ""
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        address = policy.resolve(host, port)
    except (AddressRefused, ValueError) as exc:
        return Attempt(False, error=f"refused: {exc}")
    shown = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    target = urlunsplit((scheme, f"{shown}:{port}", parts.path or "/", parts.query, ""))
    body = event_body(event.payload)
    timestamp = str(int(time.time()))
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "User-Agent": f"patchfarm-webhooks/{__version__}",
        EVENT_HEADER: event.type,
        EVENT_ID_HEADER: str(event.id),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(event.secret, timestamp, body),
    }
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    started = time.monotonic()
    try:
        with httpx.Client(timeout=settings.timeout_s, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("POST", target, content=body, headers=headers, extensions=extensions)
            response = client.send(request, stream=True)
            try:
                answer = _read_capped(response, settings.max_response_bytes, started + settings.timeout_s)
            finally:
                response.close()
    except httpx.TimeoutException:
        return Attempt(False, error=f"no answer within {settings.timeout_s:g}s")
    except httpx.HTTPError as exc:
        return Attempt(False, error=_printable(f"{type(exc).__name__}: {exc}"))
    code = response.status_code
    if 200 <= code < 300:
        return Attempt(True, code)
    if 300 <= code < 400:
        where = _printable(response.headers.get("location", ""))
        return Attempt(False, code, f"HTTP {code}: redirect to {where or '?'} not followed")
    excerpt = _printable(answer.decode("utf-8", "replace"))
    return Attempt(False, code, f"HTTP {code}" + (f": {excerpt}" if excerpt else ""))


def _read_capped(response: httpx.Response, limit: int, deadline: float) -> bytes:
    """At most ``limit`` bytes of the answer, read until ``deadline`` at the latest."""
    answer = b""
    if limit == 0:
        return answer
    for chunk in response.iter_raw():
        answer += chunk
        if len(answer) >= limit or time.monotonic() > deadline:
            break
    return answer[:limit]


class WebhookDeliverer:
    """Delivers the outbox's due events, a batch per pass; several may run at once (each claim
    is exclusive until its lease runs out)."""

    def __init__(self, settings: WebhooksSettings, session_factory: Any) -> None:
        self.settings, self.sessions = settings, session_factory
        self.policy = settings.policy

    def run_pass(self, now: datetime | None = None) -> DeliveryReport:
        """Deliver up to ``webhooks.batch`` due events, ``webhooks.concurrency`` at once. An event
        is claimed only when a thread is free to send it (one event per job, so a job's events
        stay in order): no claim waits behind a slow receiver while its lease runs out, and a
        slow receiver holds up only its own thread."""
        report = DeliveryReport()
        left, width = self.settings.batch, min(self.settings.concurrency, self.settings.batch)
        running: set[Future[str]] = set()
        more = True
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="farm-webhook") as pool:
            while True:
                wanted = min(width - len(running), left)
                if more and wanted > 0:
                    with session_scope(self.sessions) as session:
                        claimed = claim_due(session, now or utcnow(), wanted, self.settings.claim_lease_s)
                    left -= len(claimed)
                    more = len(claimed) == wanted  # fewer: nothing else is due now
                    running |= {pool.submit(self._deliver, event) for event in claimed}
                if not running:
                    return report
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    outcome = future.result()
                    setattr(report, outcome, getattr(report, outcome) + 1)

    def _deliver(self, event: ClaimedEvent) -> str:
        """POST one claimed event and record how it went; returns the report field it counts in."""
        attempt = post_event(event, self.settings, self.policy)
        now = utcnow()
        host = check_webhook_url(event.url).hostname
        with session_scope(self.sessions) as session:
            if attempt.accepted:
                written = mark_delivered(session, event, attempt.http_status or 0, now)
                outcome = "delivered"
            else:
                again = retry_at(event.attempt, event.created_at, now, self.settings)
                written = mark_failed(session, event, attempt.error or "failed", attempt.http_status, again)
                outcome = "dead" if again is None else f"failed, next try at {again:%H:%M:%S}"
        if not written:
            return "lost"
        level = logging.INFO if attempt.accepted else logging.WARNING
        log.log(
            level,
            "webhook %s %s of job %s to %s, attempt %d: %s%s",
            event.type,
            event.id,
            event.job_id,
            host,
            event.attempt,
            outcome,
            f" ({attempt.error})" if attempt.error else "",
        )
        if attempt.accepted:
            return "delivered"
        return "dead" if outcome == "dead" else "failed"


class WebhookLoop:
    """Runs :meth:`WebhookDeliverer.run_pass` every ``webhooks.poll_interval_s`` on a daemon
    thread of a control worker; a failed pass (a database restarting) is logged and the next one
    runs on time."""

    def __init__(self, deliverer: WebhookDeliverer) -> None:
        self.deliverer = deliverer
        interval = deliverer.settings.poll_interval_s
        self._thread = PeriodicThread("farm-webhooks", interval, deliverer.run_pass, "webhook deliveries")

    def __enter__(self) -> WebhookLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()
