"""A folder on disk as an object store (the embedded mode, and single-machine setups).

The key is the path relative to ``root``. Writes are atomic: the bytes go to a hidden temporary
file in the target folder, are fsynced, then ``os.replace``d over the target, so a reader never
sees half an object (downloads work the same way). A write that fails removes its temporary file
(or, where the folder has turned read-only, the next write does). The sha256 is computed while
writing and, for ``head``, from the file.

A disk that is full, read-only, over quota or failing (``ENOSPC``, ``EROFS``, ``EDQUOT``, ``EIO``
and the like, :data:`ENVIRONMENT_ERRNOS`) is an environment fault, not a property of the object:
it raises :class:`~storage.errors.StorageUnavailable` (retryable) naming the store and the key, so
workers wait it out like any store outage.

No sidecar files: the content type is always guessed from the key's extension and custom
metadata is accepted and dropped, so ``put_*`` returns exactly what ``head`` later reports (a
``content_type`` given to ``put_*`` is ignored). ``S3Store`` keeps both.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from storage.errors import InvalidKey, ObjectNotFound, StorageAccessDenied, StorageError, StorageUnavailable
from storage.objects.base import ObjectInfo, guess_content_type
from storage.objects.keys import validate_key, validate_prefix

_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"  # no valid key part starts with "."; list() skips these

# errno values that describe the disk, not the object: retrying once it is fixed can succeed.
ENVIRONMENT_ERRNOS: frozenset[int] = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",  # no space left on device
        "EDQUOT",  # disk quota exceeded
        "EROFS",  # read-only file system (remounted read-only after an error, a full snapshot...)
        "EIO",  # I/O error
        "EAGAIN",  # resource temporarily unavailable
        "EBUSY",
        "EINTR",
        "ENOMEM",
        "ENFILE",  # the system's open-file table is full
        "EMFILE",  # this process's open-file limit
        "ETIMEDOUT",  # a network file system timed out
        "ESTALE",  # a network file system's handle went stale
        "ENOTCONN",
        "EREMOTEIO",
        "ENOLCK",
    )
    if hasattr(errno, name)
)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> bool:
    """Remove ``path`` if it is there; ``False`` when it could not be removed (a read-only folder)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def _atomic_write(dest: Path, fill: Callable[[BinaryIO], None], leftovers: set[Path] | None = None) -> None:
    """Create ``dest`` via a temporary file in its folder (mode 0666 minus umask) and ``os.replace``.

    On failure the temporary file is removed; one that cannot be (the folder turned read-only
    mid-write) is added to ``leftovers`` for a later sweep, and the original error is raised."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{_TMP_PREFIX}{secrets.token_hex(8)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if not _remove(tmp) and leftovers is not None:
            leftovers.add(tmp)
        raise


class LocalStore:
    """Objects as files under ``root`` (created on the first write)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self._leftovers: set[Path] = set()  # temporary files a failed write could not remove

    def describe(self) -> str:
        return f"LocalStore at {self.root}"

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- paths ------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise InvalidKey(f"key: {key!r} escapes the store root")
        return path

    def _info(self, key: str, path: Path, sha256: str | None) -> ObjectInfo:
        stat = path.stat()
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            sha256=sha256,
            content_type=guess_content_type(key),
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def _failed(self, exc: OSError, op: str, key: str) -> StorageError:
        """The farm's error for ``exc``: an environment fault (:data:`ENVIRONMENT_ERRNOS`) is
        :class:`StorageUnavailable` (retryable); the message names the store and the key."""
        where = f"{op} {key!r} in {self.describe()}"
        if isinstance(exc, PermissionError):
            return StorageAccessDenied(f"{where}: permission denied")
        if isinstance(exc, NotADirectoryError | FileExistsError | IsADirectoryError):
            return StorageError(f"{where}: a folder and an object would share a name")
        reason = exc.strerror or type(exc).__name__
        code = errno.errorcode.get(exc.errno or -1)
        if exc.errno in ENVIRONMENT_ERRNOS:  # the cause first: log lines cut long messages short
            return StorageUnavailable(f"{op} {key!r}: {reason} ({code}) in {self.describe()}; retry when it recovers")
        return StorageError(f"{where}: {reason}" + (f" ({code})" if code else ""))

    def _sweep(self) -> None:
        """Remove temporary files earlier failed writes had to leave (the store was read-only)."""
        for path in list(self._leftovers):
            if _remove(path):
                self._leftovers.discard(path)

    # -- writes -----------------------------------------------------------------------------
    def _write(self, key: str, source: Callable[[], Iterator[bytes]]) -> ObjectInfo:
        path = self._path(key)
        digest = hashlib.sha256()

        def fill(fh: BinaryIO) -> None:
            for chunk in source():
                digest.update(chunk)
                fh.write(chunk)

        self._sweep()
        try:
            _atomic_write(path, fill, self._leftovers)
        except OSError as exc:
            raise self._failed(exc, "put", key) from exc
        return self._info(key, path, digest.hexdigest())

    def put_bytes(
        self, key: str, data: bytes, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        return self._write(key, lambda: iter((data,)))

    def put_file(
        self, key: str, path: Path, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        self._path(key)  # refuse a bad key before opening anything

        def chunks() -> Iterator[bytes]:
            with Path(path).open("rb") as src:
                while chunk := src.read(_CHUNK):
                    yield chunk

        return self._write(key, chunks)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    # -- reads ------------------------------------------------------------------------------
    def _missing(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key!r} in {self.describe()}")

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        except OSError as exc:
            raise self._failed(exc, "get", key) from exc

    def read_chunks(self, key: str, start: int = 0) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None
        except OSError as exc:
            raise self._failed(exc, "get", key) from exc
        return self._chunks_of(fh, key, start)

    def _chunks_of(self, fh: BinaryIO, key: str, start: int) -> Iterator[bytes]:
        with fh:
            try:
                fh.seek(start)
                while chunk := fh.read(_CHUNK):
                    yield chunk
            except OSError as exc:
                raise self._failed(exc, "get", key) from exc

    def download(self, key: str, path: Path) -> Path:
        src = self._path(key)
        dest = Path(path)
        if not src.is_file():
            raise self._missing(key)
        try:
            with src.open("rb") as fh:
                _atomic_write(dest, lambda out: shutil.copyfileobj(fh, out, _CHUNK))
        except FileNotFoundError:
            raise self._missing(key) from None
        except OSError as exc:
            raise self._failed(exc, "download", key) from exc
        return dest

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return self._info(key, path, _sha256_file(path))
        except FileNotFoundError:  # deleted meanwhile
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under ``prefix``, sorted by key; ``sha256`` is left out (``head`` has it)."""
        prefix = validate_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return iter(())
        keys = sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        return self._infos(keys)

    def _infos(self, keys: list[str]) -> Iterator[ObjectInfo]:
        for key in keys:
            try:
                yield self._info(key, self.root / key, None)
            except FileNotFoundError:  # deleted since the listing
                continue

    def url(self, key: str, expires_s: int | None = None) -> str:
        """The object's ``file://`` URI (``expires_s`` does not apply; the object need not exist)."""
        return self._path(key).as_uri()
