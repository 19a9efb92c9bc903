"""Content digests of files and model folders: streamed SHA-256, each file read once per change.

:func:`file_sha256` hashes a file in 1 MiB chunks (calling ``progress`` with each chunk's size)
and remembers the digest per (path, size, mtime_ns, inode) for the life of the process, so a
folder fingerprinted again is not read again unless a file was replaced or rewritten.
:func:`folder_files` lists what a model folder holds (regular files, hidden names skipped) and
:func:`content_fingerprint` hashes a folder (or one file) from its files' relative paths and
content digests: two fine-tunes with the same file names and sizes get different fingerprints.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

CHUNK_BYTES = 1 << 20
_MEMO_LIMIT = 65_536  # digests remembered per process (a few MB at most)

_memo: dict[tuple[str, int, int, int], str] = {}
_memo_lock = threading.Lock()


def _identity(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def file_sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The SHA-256 (hex) of the file's content, read in chunks; remembered per (path, size,
    mtime_ns, inode), so an unchanged file is read once per process. ``progress`` gets the size
    of each chunk read (or the whole size at once when the digest was remembered)."""
    before = _identity(path)
    with _memo_lock:
        known = _memo.get(before)
    if known is not None:
        if progress is not None:
            progress(before[1])
        return known
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    if _identity(path) == before:  # not rewritten while it was read: safe to remember
        with _memo_lock:
            if len(_memo) >= _MEMO_LIMIT:
                _memo.clear()
            _memo[before] = digest.hexdigest()
    return digest.hexdigest()


def remember_sha256(path: Path, digest: str) -> None:
    """Record ``digest`` as the content of ``path`` as it is now (a file just verified and renamed
    into place keeps its inode, size and mtime: hashing it again would read the same bytes)."""
    identity = _identity(path)
    with _memo_lock:
        _memo[identity] = digest


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every regular file under ``folder`` (or just ``folder`` when it
    is a file), sorted; names starting with ``.`` (and what is under them) are skipped."""
    if folder.is_file():
        return [(folder.name, folder)]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(root) / name
            if not name.startswith(".") and path.is_file():
                found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


def content_fingerprint(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """A hash of a model folder's content (or of one file): every file's relative path and
    SHA-256 (:func:`file_sha256`, so it is computed once per change of a file)."""
    if path.is_file():
        return file_sha256(path, progress)
    digest = hashlib.sha256()
    for rel, file in folder_files(path):
        digest.update(f"{rel}\0{file_sha256(file, progress)}\n".encode())
    return digest.hexdigest()
