"""Riding out service outages: a database, broker or object store that is restarting is waited
for, with exponential backoff, instead of failing the work that needed it.

:func:`unavailable_service` tells a service outage (connection refused or dropped, a server
shutting down or still loading) from every other error; :func:`ride_out` retries an idempotent
step through such outages for at most ``wait_s`` seconds, then raises :class:`ServiceUnavailable`
(retryable). Workers use it around each step of a shard and each control task, so a restart of
Postgres, Redis, RabbitMQ or the S3 server delays a job and loses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from farm.errors import FarmError, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 15.0


class ServiceUnavailable(FarmError):
    """A service stayed unavailable for longer than the worker waits for it."""

    retryable = True


def unavailable_service(exc: BaseException) -> str | None:
    """``"database"``, ``"broker"`` or ``"object store"`` when ``exc`` means that service is
    unreachable or restarting; ``None`` for anything else."""
    if isinstance(exc, StorageUnavailable):
        return "object store"
    if isinstance(exc, ServiceUnavailable):
        return None  # already waited for
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.TimeoutError)):
        return "database"
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return "database"
    from kombu.exceptions import OperationalError as KombuOperationalError

    if isinstance(exc, KombuOperationalError):
        return "broker"
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a Celery[redis] dependency
        RedisConnectionError = RedisTimeoutError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return "broker"
    from amqp.exceptions import RecoverableConnectionError

    if isinstance(exc, (RecoverableConnectionError, ConnectionError)):
        return "broker"
    return None


def ride_out(
    step: Callable[[], T],
    *,
    what: str,
    wait_s: float,
    check: Callable[[], None] | None = None,
    landed: Callable[[], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """``step()``, called again after a service outage (0.5 s, 1 s, 2 s ... at most 15 s apart)
    until it succeeds or ``wait_s`` seconds have passed. ``check`` runs before each new try and
    may raise to stop waiting (a lost lease, a cancelled job). ``step`` must be safe to repeat;
    for a write whose commit may have landed before the connection dropped, ``landed()`` says so
    before each new try (not the first), and the step is then not repeated (``None``)."""
    started = time.monotonic()
    delay = FIRST_DELAY_S
    tries = 0
    while True:
        try:
            if tries and landed is not None and landed():
                return None
            return step()
        except Exception as exc:
            service = unavailable_service(exc)
            if service is None:
                raise
            tries += 1
            waited = time.monotonic() - started
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            if waited + delay > wait_s:
                raise ServiceUnavailable(
                    f"{what}: the {service} was unavailable for {waited:.0f}s ({tries} tries); last: {reason}"
                ) from exc
            log.warning("%s: the %s is unavailable (%s); try %d again in %.1fs", what, service, reason, tries, delay)
        sleep(delay)
        delay = min(MAX_DELAY_S, delay * 2)
        if check is not None:
            check()
