"""Object keys built only from validated parts.

A *part* is one path segment: 1-128 characters from ``[A-Za-z0-9._-]``, starting with a letter or
digit, with no ``..`` anywhere (so never ``.``, ``..`` or a hidden name). A *prefix* is zero or
more parts joined by ``/`` (one trailing ``/`` is tolerated and dropped). A *key* is one or more
parts joined by ``/``. Nothing else can reach a key: no traversal, no absolute paths, no
backslashes, no control characters, no empty segments.

Layout: ``{prefix}/{job_id}/{shard_index:05d}/{item}.{ext}`` and ``{prefix}/{job_id}/manifest.json``
(with an empty prefix the key starts at ``{job_id}``); a job's post-steps (``encode``, ...) are jobs
whose prefix is ``{prefix}/{job_id}/steps`` (:func:`steps_prefix`). Every problem raises
:class:`storage.errors.InvalidKey` naming the field and the reason.

Namespaces: the top-level folders in :data:`RESERVED_FOLDERS` belong to the farm (``inputs``:
content-addressed uploads and bulk manifests; ``models``: the model registry). No output may be
written there: :func:`check_output_folder` refuses an output prefix (or a bulk name that would
be the outputs' top folder) starting with one, in any letter case, so no spec can overwrite an
input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from storage.errors import InvalidKey

MAX_PART_LENGTH = 128
MAX_KEY_LENGTH = 1024
PART_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_PART_LENGTH - 1}}}")
MAX_SHARD_INDEX = 99_999  # five digits in the key
RESERVED_FOLDERS: Mapping[str, str] = MappingProxyType(
    {"inputs": "uploaded inputs and bulk manifests", "models": "the model registry"}
)
EXTENSIONS = frozenset(
    {"png", "jpg", "jpeg", "webp", "gif", "mp4", "json", "jsonl", "txt", "safetensors", "tar", "parquet"}
)
STEPS_FOLDER = "steps"  # a job's post-steps write under {prefix}/{job_id}/steps/{step job id}/


def _shown(value: str) -> str:
    """``value`` as it may appear in an error message: short, with control characters escaped."""
    return repr(value[:80] + ("..." if len(value) > 80 else ""))


def validate_part(value: object, what: str = "key part") -> str:
    """Return ``value`` as a safe single path segment, or raise :class:`InvalidKey` naming ``what``."""
    if not isinstance(value, str):
        raise InvalidKey(f"{what}: expected a string, got {type(value).__name__}")
    if not value:
        raise InvalidKey(f"{what}: must not be empty")
    if len(value) > MAX_PART_LENGTH:
        raise InvalidKey(f"{what}: longer than {MAX_PART_LENGTH} characters")
    if PART_RE.fullmatch(value) is None or ".." in value:
        raise InvalidKey(
            f"{what}: {_shown(value)} is not allowed (use A-Z a-z 0-9 . _ -, starting with a letter or "
            "digit; no '..', '/', '\\', spaces or control characters)"
        )
    return value


def validate_prefix(prefix: object, what: str = "prefix") -> str:
    """Return a normalised prefix (``""`` or parts joined by ``/``), or raise :class:`InvalidKey`."""
    if not isinstance(prefix, str):
        raise InvalidKey(f"{what}: expected a string, got {type(prefix).__name__}")
    if prefix == "":
        return ""
    if prefix.startswith("/"):
        raise InvalidKey(f"{what}: must be relative (no leading '/')")
    parts = prefix.removesuffix("/").split("/")
    for i, part in enumerate(parts, start=1):
        validate_part(part, f"{what} segment {i}")
    return "/".join(parts)


def validate_key(key: object, what: str = "key") -> str:
    """Check a full key as passed to a store: every ``/`` segment must be a valid part."""
    if not isinstance(key, str):
        raise InvalidKey(f"{what}: expected a string, got {type(key).__name__}")
    if not key:
        raise InvalidKey(f"{what}: must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"{what}: longer than {MAX_KEY_LENGTH} characters")
    if key.startswith("/"):
        raise InvalidKey(f"{what}: must be relative (no leading '/')")
    for i, part in enumerate(key.split("/"), start=1):
        validate_part(part, f"{what} segment {i}")
    return key


def check_output_folder(folder: str, what: str = "output_prefix") -> str:
    """Return ``folder`` (a valid prefix) unless its first segment is a reserved top-level folder
    (compared case-insensitively: a case-insensitive disk would merge them), else :class:`InvalidKey`."""
    first = folder.split("/", 1)[0]
    purpose = RESERVED_FOLDERS.get(first.lower())
    if purpose is not None:
        raise InvalidKey(
            f"{what}: {_shown(folder)} would put outputs in '{first}/', which the farm keeps for {purpose}; "
            f"outputs may not start with {' or '.join(repr(name) for name in RESERVED_FOLDERS)}"
        )
    return folder


def join_key(*parts: str) -> str:
    """Join prefixes and parts (each ``""`` or one or more valid segments) into a validated key."""
    segments = [validate_prefix(p, "key") for p in parts]
    return validate_key("/".join(s for s in segments if s))


def validate_extension(ext: object) -> str:
    """Return ``ext`` if it is one of :data:`EXTENSIONS`, else raise :class:`InvalidKey`."""
    if ext not in EXTENSIONS:
        shown = _shown(ext) if isinstance(ext, str) else type(ext).__name__
        raise InvalidKey(f"extension: {shown} is not one of {', '.join(sorted(EXTENSIONS))}")
    return ext  # type: ignore[return-value]


def job_prefix(prefix: str, job_id: object) -> str:
    """``{prefix}/{job_id}``: the folder holding every output of a job (``job_id`` may be a UUID)."""
    return join_key(validate_prefix(prefix), validate_part(str(job_id), "job_id"))


def artifact_key(prefix: str, job_id: object, shard_index: int, item: str | int, ext: str) -> str:
    """``{prefix}/{job_id}/{shard_index:05d}/{item}.{ext}``; an integer ``item`` is written ``%06d``."""
    if isinstance(shard_index, bool) or not isinstance(shard_index, int):
        raise InvalidKey(f"shard_index: expected an integer, got {type(shard_index).__name__}")
    if not 0 <= shard_index <= MAX_SHARD_INDEX:
        raise InvalidKey(f"shard_index: {shard_index} is outside 0..{MAX_SHARD_INDEX}")
    if isinstance(item, int) and not isinstance(item, bool):
        if item < 0:
            raise InvalidKey(f"item: {item} is negative")
        item = f"{item:06d}"
    name = f"{validate_part(item, 'item')}.{validate_extension(ext)}"
    return join_key(job_prefix(prefix, job_id), f"{shard_index:05d}", validate_part(name, "item"))


def steps_prefix(prefix: str, job_id: object) -> str:
    """``{prefix}/{job_id}/steps``: the output prefix of the post-steps of job ``job_id`` (a step
    job's outputs are then ``{prefix}/{job_id}/steps/{step_job_id}/...``, beside its source's)."""
    return join_key(job_prefix(prefix, job_id), STEPS_FOLDER)


def manifest_key(prefix: str, job_id: object) -> str:
    """``{prefix}/{job_id}/manifest.json``."""
    return join_key(job_prefix(prefix, job_id), "manifest.json")


def contact_sheet_key(prefix: str, job_id: object) -> str:
    """``{prefix}/{job_id}/contact_sheet.png``."""
    return join_key(job_prefix(prefix, job_id), "contact_sheet.png")


# -- the model registry (``models/``) --------------------------------------------------------------
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MODEL_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")


def validate_sha256(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is a SHA-256 hex digest (64 lower-case hex digits), else :class:`InvalidKey`."""
    if not isinstance(value, str) or SHA256_RE.fullmatch(value) is None:
        shown = _shown(value) if isinstance(value, str) else type(value).__name__
        raise InvalidKey(f"{what}: {shown} is not a SHA-256 digest (64 lower-case hex digits)")
    return value


def model_blob_key(digest: str) -> str:
    """``models/blobs/sha256/<digest>``: one file of a registered model, named by its content."""
    return join_key("models/blobs/sha256", validate_sha256(digest))


def model_manifest_key(digest: str) -> str:
    """``models/manifests/sha256/<digest>.json``: a version manifest, named by its own digest."""
    return join_key("models/manifests/sha256", f"{validate_sha256(digest)}.json")


def model_versions_prefix(name: str) -> str:
    """``models/names/<name>``: the folder of a model's version pointers."""
    return join_key("models/names", validate_part(name, "name"))


def model_version_key(name: str, version: str) -> str:
    """``models/names/<name>/<version>.json``: which manifest a model's version is (never rewritten)."""
    if not isinstance(version, str) or MODEL_VERSION_RE.fullmatch(version) is None:
        raise InvalidKey(f"version: {_shown(str(version))} is not a version number (1, 2, ...)")
    return join_key(model_versions_prefix(name), f"{version}.json")
