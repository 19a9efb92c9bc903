"""Where a dataset package goes: a local folder, or a prefix in the farm's object store.

Writers fill a local scratch path (a file, or a folder for the ``files`` format); the target
*commits* it under its name in one step: a folder renames it into place (``os.replace``), the
store uploads it with ``put_file`` (multipart above the store's threshold on S3) and the object
exists only once the upload completed. So a killed run leaves no half-written shard under a
shard's name; at most a finished shard the manifest does not list yet, which the next run
removes (:meth:`remove`) and writes again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from storage.errors import ObjectNotFound
from storage.objects import LocalStore, ObjectStore
from storage.objects.keys import check_output_folder, join_key, validate_key, validate_prefix

_SCRATCH = ".tmp-"  # scratch names in a folder target: never a valid key part, never listed


class Target(Protocol):
    """A package's destination; names are keys relative to it (``00000.tar``, ``00000/x.png``)."""

    def describe(self) -> str: ...

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or ``None`` when there is none."""
        ...

    def write(self, name: str, data: bytes) -> None:
        """Store small bytes (the manifest, a stats JSON, the card) under ``name`` atomically."""
        ...

    def scratch(self, name: str) -> Path:
        """A fresh local path for a writer to fill (not yet existing); :meth:`commit` moves it."""
        ...

    def commit(self, scratch: Path, name: str) -> None:
        """Put the filled scratch path (file or folder) under ``name``, replacing what is there."""
        ...

    def names(self) -> Iterator[str]:
        """Every name under the target (files inside folders as ``folder/file``)."""
        ...

    def remove(self, name: str) -> None:
        """Remove the object, or every object in the folder ``name``."""
        ...


class FolderTarget:
    """A package in a local folder (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._store = LocalStore(self.root)

    def describe(self) -> str:
        return str(self.root)

    def read(self, name: str) -> bytes | None:
        try:
            return self._store.get_bytes(name)
        except ObjectNotFound:
            return None

    def write(self, name: str, data: bytes) -> None:
        self._store.put_bytes(name, data)

    def scratch(self, name: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=_SCRATCH, dir=self.root))
        return path / validate_key(name).replace("/", "_")

    def commit(self, scratch: Path, name: str) -> None:
        dest = self.root / validate_key(name)
        if dest.is_dir():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch, dest)
        shutil.rmtree(scratch.parent, ignore_errors=True)

    def names(self) -> Iterator[str]:
        for info in self._store.list(""):
            yield info.key

    def remove(self, name: str) -> None:
        path = self.root / validate_key(name)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def sweep(self) -> None:
        """Remove scratch folders a killed run left in the folder."""
        for path in self.root.glob(f"{_SCRATCH}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class StoreTarget:
    """A package under ``prefix`` in an object store; scratch files go to the system's temp folder."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = check_output_folder(validate_prefix(prefix, "--out store key"), "--out store key")

    def describe(self) -> str:
        return f"store:{self.prefix} ({self.store.describe()})"

    def _key(self, name: str) -> str:
        return join_key(self.prefix, name)

    def read(self, name: str) -> bytes | None:
        try:
            return self.store.get_bytes(self._key(name))
        except ObjectNotFound:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.store.put_bytes(self._key(name), data)

    def scratch(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix="farm-package-")) / validate_key(name).replace("/", "_")

    def commit(self, scratch: Path, name: str) -> None:
        try:
            if scratch.is_dir():
                for path in sorted(scratch.iterdir()):
                    self.store.put_file(self._key(f"{name}/{path.name}"), path)
            else:
                self.store.put_file(self._key(name), scratch)
        finally:
            shutil.rmtree(scratch.parent, ignore_errors=True)

    def names(self) -> Iterator[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        for info in self.store.list(self.prefix):
            yield info.key[start:]

    def remove(self, name: str) -> None:
        key = self._key(name)
        if self.store.exists(key):
            self.store.delete(key)
            return
        for info in list(self.store.list(key)):
            self.store.delete(info.key)

    def sweep(self) -> None:
        """Nothing to do: scratch files live in the temp folder, removed after each commit."""


def open_target(out: str, store: ObjectStore) -> FolderTarget | StoreTarget:
    """``store:<prefix>`` (a prefix in the farm's store) or a local folder path."""
    if out.startswith("store:"):
        return StoreTarget(store, out.removeprefix("store:"))
    return FolderTarget(Path(out).expanduser())


@contextmanager
def committed(target: FolderTarget | StoreTarget, name: str) -> Iterator[Path]:
    """A scratch path for ``name``, committed when the block ends without error (else removed)."""
    scratch = target.scratch(name)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch.parent, ignore_errors=True)
        raise
    target.commit(scratch, name)
