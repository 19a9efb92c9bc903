"""Input images of a job (conditioning frames, identity references): references, upload, loading.

A spec names an input image by its object key: ``{"key": "inputs/sha256/<hex>.png", "sha256":
"<hex>"}`` (:class:`ImageRef`). People write ``{"path": "./face.jpg"}`` instead; the client
(:func:`upload_inputs`) checks that every such file is an image, puts a content-addressed
reference in its place, validates the whole spec with the references in place, and only then
uploads the files: a refused spec (a bad image, a bad field anywhere) writes nothing to the store,
and specs stored in the database only ever point into the object store. A key that is already
taken is not trusted: the stored object is checked (:func:`stored_intact`) and replaced when its
content differs. No output can land under ``inputs/`` (see ``storage.objects.keys``).

Workers read inputs with :func:`load_image`. Everything that can be wrong with an input (a
missing object, a digest mismatch, bytes that are not an image, a truncated file, a decompression
bomb) is an :class:`InputImageError` naming the field, the file as the spec gave it (a reference
keeps it as ``name``) and the key (:func:`describe`): a user error, the shard fails with that
reason and the worker carries on.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from farm.errors import InvalidKey, ObjectNotFound, UserError
from storage.objects.base import ObjectInfo
from storage.objects.keys import join_key, validate_key

INPUTS_PREFIX = "inputs/sha256"
MAX_INPUT_BYTES = 32 << 20
MAX_INPUT_PIXELS = 64 << 20  # 64 megapixels
FORMATS = {"PNG": ("png", "image/png"), "JPEG": ("jpg", "image/jpeg"), "WEBP": ("webp", "image/webp")}
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MD5_RE = re.compile(r"[0-9a-f]{32}")
MAX_NAME_CHARS = 200  # the file name an uploaded reference keeps for messages


class InputImageError(UserError):
    """An input image is missing, unreadable or not an image."""


class ImageRef(BaseModel):
    """An input image in the object store, optionally pinned by its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    key: str
    sha256: str | None = None
    name: str | None = Field(
        default=None,
        max_length=MAX_NAME_CHARS,
        description="the file as the spec gave it (shown in messages)",
        exclude_if=lambda value: value is None,  # a reference without one dumps as before
    )

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        try:
            return validate_key(value, "key")
        except InvalidKey as exc:
            raise ValueError(str(exc)) from None

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and SHA256_RE.fullmatch(value) is None:
            raise ValueError("must be 64 lowercase hex characters")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must not contain control characters")
        return value


def describe(label: str, ref: ImageRef) -> str:
    """How a message names an input: ``identity.references[0] 'face.jpg' (inputs/sha256/ab...png)``:
    the field, the file as the spec gave it (when known) and the object key."""
    return f"{label} '{ref.name}' ({ref.key})" if ref.name else f"{label} ({ref.key})"


def _given_name(raw: str) -> str:
    """A path as the user wrote it, fit for messages and :attr:`ImageRef.name`: control characters
    replaced, long paths shortened in the middle."""
    clean = "".join("?" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in raw)
    if len(clean) <= MAX_NAME_CHARS:
        return clean
    keep = (MAX_NAME_CHARS - 3) // 2
    return f"{clean[:keep]}...{clean[-keep:]}"


def inspect_image(data: bytes, label: str) -> tuple[str, str, tuple[int, int]]:
    """``(extension, content type, (width, height))`` of image bytes; :class:`InputImageError`
    if they are not a complete PNG, JPEG or WebP image within the limits."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_INPUT_BYTES:
        raise InputImageError(f"{label}: {len(data)} bytes is more than the {MAX_INPUT_BYTES >> 20} MiB limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = image.format, image.size
            if size[0] * size[1] > MAX_INPUT_PIXELS:
                raise InputImageError(f"{label}: {size[0]}x{size[1]} is more than {MAX_INPUT_PIXELS >> 20} megapixels")
            if fmt not in FORMATS:
                raise InputImageError(f"{label}: {fmt} images are not accepted; use PNG, JPEG or WebP")
            image.load()  # decodes every pixel: truncated files fail here
    except InputImageError:
        raise
    except UnidentifiedImageError:
        raise InputImageError(f"{label}: not an image (PNG, JPEG or WebP expected)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputImageError(f"{label}: unreadable image ({str(exc).splitlines()[0][:200]})") from None
    ext, content_type = FORMATS[fmt]
    return ext, content_type, size


def _read_input(path: Path, label: str, resolved_from: str = "") -> bytes:
    """The bytes of a local input file; ``resolved_from`` says where a relative path was looked
    for (shown when the file is missing)."""
    try:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise InputImageError(f"{label}: {path} {what}{resolved_from}")
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise InputImageError(f"{label}: {path.name} is larger than {MAX_INPUT_BYTES >> 20} MiB")
        return path.read_bytes()
    except OSError as exc:
        raise InputImageError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _PendingUpload:
    """A checked local image, not yet uploaded: where it is, where it goes, what it must hash to."""

    path: Path
    label: str
    key: str
    sha256: str
    content_type: str


def _check_image_file(path: Path, label: str, resolved_from: str = "") -> _PendingUpload:
    data = _read_input(path, label, resolved_from)
    ext, content_type, _ = inspect_image(data, label)
    digest = hashlib.sha256(data).hexdigest()
    return _PendingUpload(path, label, join_key(INPUTS_PREFIX, f"{digest}.{ext}"), digest, content_type)


def stored_intact(info: ObjectInfo | None, data: bytes, sha256: str) -> bool:
    """Whether the stored object ``info`` holds exactly ``data`` (whose digest is ``sha256``).

    The size must match, and the sha256 the store reports (computed from the file by a local
    store; recorded at upload by S3); where S3 gives a plain MD5 entity tag (a single-part
    upload), the server's own MD5 of the content must match too. Anything unknown or different
    is not intact: the input is uploaded again."""
    if info is None or info.size != len(data) or info.sha256 != sha256:
        return False
    etag = (info.etag or "").strip('"')
    if MD5_RE.fullmatch(etag):  # multipart and encrypted uploads have other tags: not comparable
        return etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
    return True


def _upload(store: Any, pending: _PendingUpload) -> None:
    """Upload a checked file, read again (images are not all held in memory at once); a file that
    changed since it was checked is refused. An object already under the key is kept only when
    it is intact (:func:`stored_intact`), otherwise it is replaced: a content-addressed key does
    not prove its content."""
    data = pending_bytes(pending)
    if stored_intact(store.head(pending.key), data, pending.sha256):
        return
    store.put_bytes(pending.key, data, content_type=pending.content_type)


def upload_image_file(store: Any, path: Path, label: str) -> dict[str, str]:
    """Check and upload one local image; returns its reference as JSON-able data."""
    pending = _check_image_file(path, label)
    _upload(store, pending)
    return {"key": pending.key, "sha256": pending.sha256}


def _resolve_paths(data: Any, base_dir: Path, label: str, found: list[_PendingUpload]) -> Any:
    """``data`` with every ``{"path": ...}`` mapping replaced by the reference its file will have;
    each file is checked (an image within the limits) and listed in ``found``, nothing is written."""
    if isinstance(data, dict):
        if set(data) == {"path"}:
            raw = data["path"]
            if not isinstance(raw, str) or not raw:
                raise InputImageError(f"{label}.path: expected a file path")
            name = _given_name(raw)
            path = Path(raw).expanduser()
            if path.is_absolute():
                resolved_from = f" (~ is {Path.home()})" if raw.startswith("~") else ""
            else:
                path = base_dir / path
                resolved_from = f" (a relative path is resolved against {base_dir})"
            pending = _check_image_file(path, f"{label} '{name}'", resolved_from)
            found.append(pending)
            return {"key": pending.key, "sha256": pending.sha256, "name": name}
        return {k: _resolve_paths(v, base_dir, f"{label}.{k}", found) for k, v in data.items()}
    if isinstance(data, list):
        return [_resolve_paths(v, base_dir, f"{label}[{i}]", found) for i, v in enumerate(data)]
    return data


def upload_inputs(
    data: Any, store: Any, base_dir: Path, label: str = "spec", check: Callable[[Any], Any] | None = None
) -> Any:
    """``data`` with every ``{"path": ...}`` mapping replaced by an uploaded image reference
    (relative paths are relative to ``base_dir``). Other values are returned unchanged.

    Every file is checked first, then ``check(data)`` runs with the references in place (the
    client validates the whole spec there, :func:`farm.specs.parse_spec`, and may return a spec
    to use instead) before the first upload: nothing is stored for a spec that is refused."""
    found: list[_PendingUpload] = []
    out = _resolve_paths(data, base_dir, label, found)
    if check is not None:
        out = check(out)
    for pending in found:
        _upload(store, pending)
    return out


# -- through the API: the client plans and sends, the server checks and stores --------------------
def plan_uploads(data: Any, base_dir: Path, label: str = "spec") -> tuple[Any, list[_PendingUpload]]:
    """``data`` with every ``{"path": ...}`` replaced by the reference its file will have, and the
    checked files to send (nothing is read into memory for long, nothing is sent)."""
    found: list[_PendingUpload] = []
    return _resolve_paths(data, base_dir, label, found), found


def pending_bytes(pending: _PendingUpload) -> bytes:
    """A planned file's bytes, read again; refused when it changed since it was checked."""
    data = _read_input(pending.path, pending.label)
    if hashlib.sha256(data).hexdigest() != pending.sha256:
        raise InputImageError(f"{pending.label}: {pending.path} changed while the job was being submitted")
    return data


def store_input(store: Any, data: bytes, label: str, sha256: str | None = None) -> dict[str, str]:
    """Check bytes sent for an input (size, an image of a known format within the pixel limit,
    ``sha256`` when the sender gave one) and store them content-addressed; their reference."""
    if len(data) > MAX_INPUT_BYTES:
        raise InputImageError(f"{label}: larger than {MAX_INPUT_BYTES >> 20} MiB")
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and sha256 != digest:
        raise InputImageError(f"{label}: the bytes received do not match sha256 {sha256[:80]}")
    ext, content_type, _ = inspect_image(data, label)
    key = join_key(INPUTS_PREFIX, f"{digest}.{ext}")
    if not stored_intact(store.head(key), data, digest):
        store.put_bytes(key, data, content_type=content_type)
    return {"key": key, "sha256": digest}


def local_paths(data: Any, label: str = "spec") -> list[str]:
    """Where ``data`` names a file by ``{"path": ...}`` (only a client can upload those)."""
    if isinstance(data, dict):
        if set(data) == {"path"}:
            return [label]
        return [p for k, v in data.items() for p in local_paths(v, f"{label}.{k}")]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in local_paths(v, f"{label}[{i}]")]
    return []


def missing_inputs(store: Any, data: Any, label: str = "spec") -> list[tuple[str, str]]:
    """``(field, reason)`` for each input reference of ``data`` whose object is not in the store
    (or differs from its sha256): a spec sent to the API may only name inputs already sent."""
    found: list[tuple[str, str]] = []
    if isinstance(data, dict):
        key = data.get("key")
        if isinstance(key, str) and key.startswith(INPUTS_PREFIX + "/") and set(data) <= {"key", "sha256", "name"}:
            info = store.head(key)
            digest = data.get("sha256")
            if info is None:
                found.append((label, f"input {key} was not uploaded (PUT /v1/inputs first)"))
            elif isinstance(digest, str) and info.sha256 not in (None, digest):
                found.append((label, f"input {key} does not match its sha256"))
            return found
        for k, v in data.items():
            found.extend(missing_inputs(store, v, f"{label}.{k}"))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.extend(missing_inputs(store, v, f"{label}[{i}]"))
    return found


def load_image(store: Any, ref: ImageRef, label: str) -> Any:
    """The referenced image as an RGB PIL image, fully decoded."""
    from PIL import Image

    named = describe(label, ref)
    try:
        data = store.get_bytes(ref.key)
    except ObjectNotFound:
        raise InputImageError(f"{named}: not in the object store") from None
    if ref.sha256 is not None and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise InputImageError(f"{named}: the stored object does not match its sha256 (changed since submit)")
    inspect_image(data, named)
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
