"""Object keys built only from validated parts.

A *part* is one path segment: 1-128 characters from ``[A-Za-z0-9._-]``, starting with a letter or
digit (so never ``.``, ``..`` or a hidden name). A *prefix* is zero or more parts joined by
``/``. Nothing else can reach a key: no traversal, no absolute paths, no control characters, no
empty segments.

Layout: ``{prefix}/{job_id}/{shard_index:05d}/{item}.{ext}`` and ``{prefix}/{job_id}/manifest.json``.
"""

from __future__ import annotations

import re

from farm.errors import InvalidKey

PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_KEY_LENGTH = 1024
EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "gif", "mp4", "json", "jsonl", "txt", "safetensors"})


def validate_part(value: object, what: str = "key part") -> str:
    """Return ``value`` as a safe single path segment, or raise :class:`InvalidKey` naming ``what``."""
    if not isinstance(value, str):
        raise InvalidKey(f"{what}: expected a string, got {type(value).__name__}")
    if not value:
        raise InvalidKey(f"{what}: must not be empty")
    if PART_RE.fullmatch(value) is None or ".." in value:
        shown = value if value.isprintable() and len(value) <= 80 else repr(value[:80])
        raise InvalidKey(
            f"{what}: {shown!s} is not allowed (use 1-128 of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit; no '..', '/', spaces or control characters)"
        )
    return value


def validate_prefix(prefix: str, what: str = "prefix") -> str:
    """Return a normalised prefix (``""`` or parts joined by ``/``), or raise :class:`InvalidKey`."""
    if not isinstance(prefix, str):
        raise InvalidKey(f"{what}: expected a string, got {type(prefix).__name__}")
    if prefix == "":
        return ""
    if prefix.startswith("/"):
        raise InvalidKey(f"{what}: must be relative (no leading '/')")
    parts = prefix.rstrip("/").split("/")
    for i, part in enumerate(parts):
        validate_part(part, f"{what} segment {i + 1}")
    return "/".join(parts)


def validate_key(key: str) -> str:
    """Check a full key (as passed to a store): every ``/`` segment must be a valid part."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("key: must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"key: longer than {MAX_KEY_LENGTH} characters")
    if key.startswith("/"):
        raise InvalidKey("key: must be relative (no leading '/')")
    for i, part in enumerate(key.split("/")):
        validate_part(part, f"key segment {i + 1}")
    return key


def join_key(*parts: str) -> str:
    """Join a prefix (possibly ``""`` or several segments) and parts into a validated key."""
    segments = [validate_prefix(p, "key") for p in parts]
    key = "/".join(s for s in segments if s)
    return validate_key(key)


def validate_extension(ext: str) -> str:
    if ext not in EXTENSIONS:
        raise InvalidKey(f"extension: {ext!r} is not one of {', '.join(sorted(EXTENSIONS))}")
    return ext


def job_prefix(prefix: str, job_id: object) -> str:
    """``{prefix}/{job_id}``: the folder holding every output of a job."""
    return join_key(validate_prefix(prefix), validate_part(str(job_id), "job_id"))


def artifact_key(prefix: str, job_id: object, shard_index: int, item: str | int, ext: str) -> str:
    """``{prefix}/{job_id}/{shard_index:05d}/{item}.{ext}``."""
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < 100_000:
        raise InvalidKey(f"shard_index: {shard_index!r} is not an integer in 0..99999")
    if isinstance(item, int) and not isinstance(item, bool):
        if item < 0:
            raise InvalidKey(f"item: {item} is negative")
        item = f"{item:06d}"
    name = f"{validate_part(item, 'item')}.{validate_extension(ext)}"
    return join_key(job_prefix(prefix, job_id), f"{shard_index:05d}", validate_part(name, "item"))


def manifest_key(prefix: str, job_id: object) -> str:
    """``{prefix}/{job_id}/manifest.json``."""
    return join_key(job_prefix(prefix, job_id), "manifest.json")
