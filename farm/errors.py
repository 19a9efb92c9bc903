"""The farm's exception hierarchy: one root, a ``retryable`` flag, user errors are ``ValueError``s.

Every error the farm raises on purpose derives from :class:`FarmError`. ``retryable`` tells the
worker whether running the same thing again later may succeed (a storage outage) or not (a bad
spec). Errors caused by what a user sent also subclass ``ValueError`` so generic callers can
catch them as such.

The root, :class:`UserError`, :class:`ConfigError` and the errors storage raises are defined in
:mod:`storage.errors` (``storage`` imports nothing from ``farm``, and its errors must still be
``FarmError``s) and re-exported here unchanged: they are the same classes, so ``except FarmError``
and ``isinstance(exc, UserError)`` hold for every error of the project whichever module named it.
This module adds the errors only the farm raises.
"""

from __future__ import annotations

from storage.errors import (
    AlreadyExists,
    ConfigError,
    FarmError,
    Forbidden,
    InvalidKey,
    InvalidTransition,
    LeaseLost,
    NotFound,
    ObjectNotFound,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
    Unauthorized,
    UserError,
)

__all__ = [
    "AlreadyExists",
    "ConfigError",
    "FarmError",
    "Forbidden",
    "InvalidKey",
    "InvalidTransition",
    "JobNotScheduled",
    "LeaseLost",
    "NotFound",
    "ObjectNotFound",
    "StorageAccessDenied",
    "StorageError",
    "StorageUnavailable",
    "Unauthorized",
    "UserError",
    "describe_error",
]


class JobNotScheduled(FarmError):
    """A job was recorded but its scheduling message could not be sent (the broker is down): the
    reconciler schedules it once the broker is back."""

    retryable = True

    def __init__(self, message: str, *, job_id: object) -> None:
        super().__init__(message)
        self.job_id = job_id


def describe_error(exc: BaseException) -> str:
    """One line (at most 2000 characters) saying what went wrong: a farm error's own message, or
    any other exception's type and first line (``OSError: disk full``)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:2000] if not isinstance(exc, FarmError) else text[:2000]
