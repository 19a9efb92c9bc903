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
    if database_unreachable(exc):
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


# SQLSTATEs of a connection the server ended or refused: class 08 (connection exception) and
# 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now (starting up or shutting
# down), 57P05 idle_session_timeout.
PG_CONNECTION_CLASS = "08"
PG_CONNECTION_STATES = frozenset({"57P01", "57P02", "57P03", "57P05"})
PG_TRANSIENT_STATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock: the step runs again
SQLITE_BUSY, SQLITE_LOCKED = 5, 6  # another process holds the file: wait, as for a restart


def database_unreachable(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error means the database cannot be reached right now: no connection
    could be made, the connection was lost or ended by the server (invalidated, SQLSTATE class 08,
    57P0x), the pool timed out, an SQLite file is locked, or the transaction lost a deadlock or a
    serialization conflict (40P01, 40001: the step is repeated whole). Anything the server or the driver
    refused about the statement itself (bad SQL, bad data, a constraint, too many parameters,
    which psycopg raises as an ``OperationalError`` too) is not: retrying it cannot help."""
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.TimeoutError, sa.DisconnectionError)):
        return True
    if not isinstance(exc, sa.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = getattr(exc.orig, "sqlstate", None)
    if state:
        return state.startswith(PG_CONNECTION_CLASS) or state in PG_CONNECTION_STATES | PG_TRANSIENT_STATES
    sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    # No code from the server: failing to connect (no statement yet) is an outage; a statement
    # the driver would not send is not.
    return exc.statement is None and isinstance(exc, (sa.OperationalError, sa.InterfaceError))


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
