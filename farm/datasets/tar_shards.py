"""WebDataset shards: POSIX tar files of ``{id}.{ext}`` (the image), ``{id}.json`` (its metadata)
and ``{id}.txt`` (the caption) per sample, in row order.

The tar is deterministic: members carry a fixed mtime, owner and mode, so the same rows give
the same bytes (and sha256) on every run. Each member is written as it comes: one image in
memory at a time.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from farm.datasets.rows import Sample

MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so a shard's bytes depend only on its samples


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: Path, samples: Iterable[Sample]) -> int:
    """Write the samples to a tar at ``path``; returns how many."""
    count = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for suffix, data in (
                (sample.ext, sample.image),
                ("json", sample.metadata_json()),
                ("txt", sample.caption.encode()),
            ):
                tar.addfile(_member(f"{sample.name}.{suffix}", len(data)), io.BytesIO(data))
            count += 1
    return count
