"""A folder on disk as an object store (the embedded mode, and single-machine setups).

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a reader never
sees half an object. The sha256 is computed from the bytes and the content type is derived from
the extension; custom metadata is accepted and not kept (S3 keeps it).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from farm.errors import InvalidKey, ObjectNotFound
from storage.objects.base import ObjectInfo
from storage.objects.keys import validate_key, validate_prefix

_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LocalStore:
    """Objects as files under ``root``; the key is the relative path."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def describe(self) -> str:
        return f"LocalStore at {self.root}"

    # -- paths ------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidKey(f"key: {key!r} escapes the store root")
        return path

    def _info(self, key: str, path: Path) -> ObjectInfo:
        stat = path.stat()
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            sha256=_sha256_file(path),
            content_type=mimetypes.guess_type(path.name)[0],
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    # -- writes -----------------------------------------------------------------------------
    def _write(self, key: str, fill) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self._info(key, path)

    def put_bytes(
        self, key: str, data: bytes, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        return self._write(key, lambda fh: fh.write(data))

    def put_file(
        self, key: str, path: Path, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        def copy(fh) -> None:
            with Path(path).open("rb") as src:
                shutil.copyfileobj(src, fh, _CHUNK)

        return self._write(key, copy)

    # -- reads ------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}") from None

    def download(self, key: str, path: Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self.describe()}")
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return dest

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return self._info(key, path) if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        prefix = validate_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return iter(())
        keys = sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        return (self._info(k, self.root / k) for k in keys)

    def url(self, key: str, expires_s: int | None = None) -> str:
        return self._path(key).as_uri()
