"""The object store protocol every backend implements, and the description of one object."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. ``sha256`` is known for objects the farm wrote (stored as metadata)."""

    key: str
    size: int
    sha256: str | None = None
    content_type: str | None = None
    last_modified: datetime | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """Where outputs and manifests go. Keys are validated by every method before any I/O."""

    def put_bytes(
        self, key: str, data: bytes, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo: ...

    def put_file(
        self, key: str, path: Path, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo: ...

    def get_bytes(self, key: str) -> bytes: ...

    def download(self, key: str, path: Path) -> Path: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def url(self, key: str, expires_s: int | None = None) -> str: ...

    def describe(self) -> str: ...
