"""The object store protocol every backend implements, and the description of one object."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable


def guess_content_type(key: str) -> str:
    """The content type for a key's extension (``application/octet-stream`` when unknown)."""
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object, as far as the store knows it.

    ``key`` is relative to the store (its prefix or root). ``sha256`` is the hex digest of the
    content where known: always from ``put_*`` and ``head``, not from ``list``. ``etag`` is the
    server's entity tag (S3 only; for multipart uploads it is not an MD5). ``content_type`` is
    what the caller gave, else guessed from the key's extension.
    """

    key: str
    size: int
    sha256: str | None = None
    etag: str | None = None
    content_type: str | None = None
    last_modified: datetime | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """Where outputs and manifests go.

    Every method validates its key (each ``/`` segment a valid part, see ``keys.py``) and raises
    :class:`storage.errors.InvalidKey` before any I/O. Failures are :class:`storage.errors.StorageError`
    subclasses: ``ObjectNotFound``, ``StorageAccessDenied``, ``StorageUnavailable`` (retryable).
    """

    def put_bytes(
        self, key: str, data: bytes, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        """Store ``data`` under ``key``, replacing any object there."""
        ...

    def put_file(
        self, key: str, path: Path, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        """Store the file at ``path`` under ``key``, replacing any object there."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The object's content; ``ObjectNotFound`` if there is none."""
        ...

    def read_chunks(self, key: str, start: int = 0) -> Iterator[bytes]:
        """The object's content from byte ``start`` on, in chunks as they arrive (one GET; a
        ranged one when ``start`` > 0); ``ObjectNotFound`` if there is none."""
        ...

    def download(self, key: str, path: Path) -> Path:
        """Write the object to ``path`` (parent folders created); ``ObjectNotFound`` if there is none."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """The object's description, or ``None`` if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under the folder ``prefix`` (``""`` = all), sorted by key."""
        ...

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A URL to read the object: a presigned GET for S3, a ``file://`` URI for a folder."""
        ...

    def describe(self) -> str:
        """A one-line human description of where objects go, with no secrets."""
        ...
