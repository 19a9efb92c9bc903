"""The project's exception hierarchy: one root, a ``retryable`` flag, user errors are ``ValueError``s.

Every error the farm raises on purpose derives from :class:`FarmError`. ``retryable`` tells the
worker whether running the same thing again later may succeed (a storage outage) or not (a bad
spec). Errors caused by what a user sent also subclass ``ValueError`` so generic callers can
catch them as such.

Why the root lives here and not in ``farm.errors``: ``storage`` stands on its own (it imports
nothing from ``farm``), yet the errors it raises must be ``FarmError``s to the farm code that
catches them (``except FarmError``, ``exc.retryable``, ``isinstance(exc, UserError)``). So the root,
:class:`UserError` and every error storage raises are defined once, here, at the bottom of the
dependency graph; :mod:`farm.errors` re-exports them (the same class objects, not copies) and adds
the errors only the farm raises. Import them from either module: ``farm.errors.NotFound is
storage.errors.NotFound``.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "ConfigError",
    "FarmError",
    "Forbidden",
    "InvalidKey",
    "InvalidTransition",
    "LeaseLost",
    "NotFound",
    "ObjectNotFound",
    "StorageAccessDenied",
    "StorageError",
    "StorageUnavailable",
    "Unauthorized",
    "UserError",
]


class FarmError(Exception):
    """Root of every error the farm raises deliberately."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class UserError(FarmError, ValueError):
    """Something the caller sent is invalid; retrying the same input cannot succeed."""


class ConfigError(UserError):
    """Settings are missing, inconsistent or unsafe for the chosen mode."""


class InvalidKey(UserError):
    """An object key part is not safe to use (traversal, absolute path, control characters)."""


class AlreadyExists(UserError):
    """A user, project or other named thing with that name exists already."""


class Unauthorized(FarmError):
    """No valid credentials: a missing, malformed, unknown, expired or revoked token."""


class Forbidden(FarmError):
    """The caller is known but may not do this (their role, or a project that is not theirs)."""


class NotFound(FarmError):
    """A job, shard, artifact or object that was asked for does not exist."""


class InvalidTransition(FarmError):
    """A state change that the transition table does not allow (or that lost a race)."""


class LeaseLost(FarmError):
    """A shard attempt was fenced out: another attempt holds a newer lease."""


class StorageError(FarmError):
    """The object store refused or failed an operation."""


class ObjectNotFound(StorageError, NotFound):
    """The object store has no object under that key."""


class StorageAccessDenied(StorageError):
    """The object store rejected our credentials or permissions."""


class StorageUnavailable(StorageError):
    """The object store could not be reached or answered with a transient failure."""

    retryable = True
