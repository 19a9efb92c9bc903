"""The per-host model cache: registry manifests materialised as diffusers folders on local disk.

Layout under ``worker.model_dir`` (shared by every worker process on the host):

- ``blobs/sha256/<digest>``: a verified blob; only ever created by renaming a download whose
  SHA-256 matched, so a file there has been checked once (and is checked again, once per worker
  process, before a model is loaded from it).
- ``blobs/sha256/.partial-<digest>``: a download in progress or cut short; the next fetch
  resumes it with a ranged GET, and restarts from zero when the result does not verify.
- ``manifests/<manifest digest>/``: the model's folder, each file a hard link to its blob; built
  in a temporary folder and renamed, so it is complete or absent. Its mtime is the LRU stamp.
- ``locks/``: ``flock`` files. ``host.lock`` is shared while materialising and exclusive while
  evicting; ``manifest-<digest>.lock`` and ``blob-<digest>.lock`` make every worker but one wait
  while a folder is built or a blob downloaded (so a blob is fetched once per host);
  ``use-<digest>.lock`` is held shared by every process that has the model loaded, and eviction
  skips a manifest whose use lock it cannot take exclusively. Locks die with their process.

Eviction runs after each materialisation: least recently used manifests go (never one in use)
until the blobs fit ``worker.model_disk_gb``; a blob goes once no manifest folder links it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from farm.errors import StorageUnavailable
from farm.file_digests import file_sha256, remember_sha256
from farm.model_refs import RegistryError
from farm.model_registry import manifest_bytes, parse_manifest
from farm.settings import FarmSettings
from farm.worker.model_cache import ModelLoadError
from storage.objects.base import ObjectStore
from storage.objects.keys import model_blob_key, validate_sha256

log = logging.getLogger(__name__)
_FETCH_ATTEMPTS = 2  # a blob that does not verify is fetched once more, then refused


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HostModelStore:
    """Materialises registry manifests into ``root`` from ``store``, within ``budget_bytes``.
    One per worker process (owned by :class:`~farm.worker.resources.WorkerResources`); several
    processes on one host share ``root`` safely."""

    def __init__(self, store: ObjectStore, root: Path, budget_bytes: int) -> None:
        self.store = store
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.blobs = self.root / "blobs" / "sha256"
        self.manifests = self.root / "manifests"
        self.locks = self.root / "locks"
        for folder in (self.blobs, self.manifests, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
        self._pins: dict[str, int] = {}  # manifest digest -> fd holding its use lock (shared)
        self.downloads = 0  # blobs this process fetched (whole or resumed)

    # -- pins ---------------------------------------------------------------------------------
    def pin(self, digest: str) -> None:
        """Hold ``digest``'s use lock (shared) until :meth:`release`: eviction leaves it alone."""
        if digest not in self._pins:
            fd = os.open(self.locks / f"use-{digest}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._pins[digest] = fd

    def release(self, digest: str) -> None:
        """This process no longer uses ``digest`` (its pipeline left the memory cache)."""
        fd = self._pins.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for digest in list(self._pins):
            self.release(digest)

    # -- materialising ------------------------------------------------------------------------
    def materialise(self, digest: str) -> Path:
        """The folder of manifest ``digest`` on this host, every file verified; downloads what is
        missing (once per host), pins it (see :meth:`pin`) and evicts others beyond the budget."""
        validate_sha256(digest, "manifest digest")
        self.pin(digest)
        try:
            with (
                _flock(self.locks / "host.lock", fcntl.LOCK_SH),
                _flock(self.locks / f"manifest-{digest}.lock", fcntl.LOCK_EX),
            ):
                folder = self._assemble(digest)
        except BaseException:
            self.release(digest)
            raise
        self.evict(keep=digest)
        return folder

    def _assemble(self, digest: str) -> Path:
        folder = self.manifests / digest
        manifest = self._manifest(digest)
        blobs = {entry["sha256"]: self._blob(entry["sha256"], entry["size"]) for entry in manifest["files"]}
        complete = folder.is_dir() and all(
            (folder / e["path"]).is_file() and os.path.samefile(folder / e["path"], blobs[e["sha256"]])
            for e in manifest["files"]
        )
        if not complete:
            building = self.manifests / f".build-{secrets.token_hex(6)}"
            for entry in manifest["files"]:
                target = building / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blobs[entry["sha256"]], target)
                except OSError:  # a file system without hard links: a copy
                    shutil.copyfile(blobs[entry["sha256"]], target)
            if folder.exists():  # an older, incomplete or stale build: moved aside, then removed
                stale = self.manifests / f".stale-{secrets.token_hex(6)}"
                folder.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            building.rename(folder)
            _fsync_dir(self.manifests)
        os.utime(folder)  # the LRU stamp
        return folder

    def _manifest(self, digest: str) -> dict:
        """The manifest: this host's copy (``manifests/<digest>.json``, so a cached model loads
        while the store is away), else the store's, then kept. Either is checked against its digest."""
        local = self.manifests / f"{digest}.json"
        if local.is_file():
            try:
                return parse_manifest(local.read_bytes(), digest)
            except RegistryError:
                log.warning("model cache: this host's copy of manifest sha256:%s is corrupt; reading it again", digest)
        data = manifest_bytes(self.store, digest)
        manifest = parse_manifest(data, digest)
        partial = self.manifests / f".manifest-{secrets.token_hex(6)}"
        partial.write_bytes(data)
        os.replace(partial, local)
        return manifest

    def _blob(self, digest: str, size: int) -> Path:
        """The verified blob ``digest`` on this host: checked if present (a bad one is removed),
        else fetched (resuming a partial download); refused after a second bad fetch."""
        path = self.blobs / digest
        with _flock(self.locks / f"blob-{digest}.lock", fcntl.LOCK_EX):
            if path.is_file():
                if path.stat().st_size == size and file_sha256(path) == digest:
                    return path
                log.warning("model cache: blob sha256:%s on this host is corrupt; fetching it again", digest)
                path.unlink()
            partial = self.blobs / f".partial-{digest}"
            for attempt in range(1, _FETCH_ATTEMPTS + 1):
                self._fetch(digest, size, partial)
                if partial.stat().st_size == size and file_sha256(partial) == digest:
                    os.replace(partial, path)
                    _fsync_dir(self.blobs)
                    remember_sha256(path, digest)
                    return path
                partial.unlink()
                log.warning("model cache: blob sha256:%s did not verify (attempt %d)", digest, attempt)
        raise ModelLoadError(
            f"model blob sha256:{digest} from {self.store.describe()} does not match its digest after "
            f"{_FETCH_ATTEMPTS} downloads: the stored copy is corrupt (push the model again)"
        )

    def _fetch(self, digest: str, size: int, partial: Path) -> None:
        """Append the rest of the blob to ``partial`` (from zero when it is longer than the blob)."""
        start = partial.stat().st_size if partial.exists() else 0
        if start > size:
            partial.unlink()
            start = 0
        if start == size:
            return
        self.downloads += 1
        try:
            with partial.open("ab") as out:
                for chunk in self.store.read_chunks(model_blob_key(digest), start):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise StorageUnavailable(f"model cache {self.root}: writing blob sha256:{digest} failed ({exc})") from exc

    # -- eviction -----------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        """Bytes the verified blobs take."""
        return sum(p.stat().st_size for p in self.blobs.iterdir() if not p.name.startswith("."))

    def cached(self) -> list[str]:
        """Manifest digests materialised on this host, least recently used first."""
        folders = [p for p in self.manifests.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime_ns)]

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used manifests not in use (and never ``keep``) until the blobs
        fit the budget; returns the digests removed."""
        removed: list[str] = []
        with _flock(self.locks / "host.lock", fcntl.LOCK_EX):
            for digest in self.cached():
                if self.disk_bytes() <= self.budget_bytes:
                    break
                if digest == keep or not self._remove_unused(digest):
                    continue
                removed.append(digest)
                for blob in self.blobs.iterdir():
                    if not blob.name.startswith(".") and blob.stat().st_nlink == 1:
                        blob.unlink()  # no manifest folder links it any more
            if self.disk_bytes() > self.budget_bytes:
                log.info("model cache %s: over its budget, every remaining model is in use", self.root)
        for digest in removed:
            log.info("model cache %s: evicted manifest sha256:%s (least recently used)", self.root, digest)
        return removed

    def _remove_unused(self, digest: str) -> bool:
        """Remove ``digest``'s folder unless some process holds its use lock."""
        fd = os.open(self.locks / f"use-{digest}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            gone = self.manifests / f".evicted-{secrets.token_hex(6)}"
            (self.manifests / digest).rename(gone)
            (self.manifests / f"{digest}.json").unlink(missing_ok=True)
            shutil.rmtree(gone, ignore_errors=True)
            return True
        finally:
            os.close(fd)


def host_model_store(settings: FarmSettings, store: ObjectStore) -> HostModelStore:
    """The host cache the settings describe: ``worker.model_dir`` (empty: ``<data_dir>/model-cache``)
    within ``worker.model_disk_gb``."""
    return HostModelStore(store, settings.model_dir, int(settings.worker.model_disk_gb * 1e9))
