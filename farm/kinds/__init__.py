"""The job kinds the farm knows: one :class:`~farm.kinds.base.JobKind` per kind, one registry.

Each built-in kind is a module here (its spec side, importable without torch) and a runner module
of the same name under :mod:`farm.worker.kinds`. Adding a kind: a module with its spec model, its
items generator and its ``KIND`` descriptor; a runner module; one :func:`register_kind` line
(docs/architecture.md walks through it, and tests/test_job_kinds.py keeps that recipe honest).
"""

from __future__ import annotations

from farm.errors import FarmError
from farm.kinds import contact_sheet, encode, face_identity, package, temporal_video, text_to_image, upscale
from farm.kinds.base import ItemSource, JobKind, ShardRunner, item_name

__all__ = [
    "DEFAULT_KIND",
    "KINDS",
    "ItemSource",
    "JobKind",
    "ShardRunner",
    "item_name",
    "job_kind",
    "known_kinds",
    "register_kind",
    "unregister_kind",
]

DEFAULT_KIND = "text_to_image"  # what a spec without ``kind`` is
KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    """Make ``kind`` one the farm accepts at submit, shards, bulk-renders and runs on workers."""
    if not isinstance(kind, JobKind):
        raise TypeError(f"{kind!r} is not a JobKind")
    if KINDS.get(kind.name, kind) is not kind:
        raise TypeError(f"job kind {kind.name!r} is already registered by {KINDS[kind.name].spec.__name__}")
    KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Forget a kind (tests and plug-ins that register one for a while)."""
    KINDS.pop(name, None)


def job_kind(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise FarmError(f"unknown job kind {name!r}; known kinds: {', '.join(known_kinds())}") from None


def known_kinds() -> list[str]:
    return sorted(KINDS)


register_kind(text_to_image.KIND)
register_kind(temporal_video.KIND)
register_kind(face_identity.KIND)
register_kind(encode.KIND)
register_kind(upscale.KIND)
register_kind(contact_sheet.KIND)
register_kind(package.KIND)
