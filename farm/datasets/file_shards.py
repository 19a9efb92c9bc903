"""The ``files`` format: one folder per shard holding ``{id}.{ext}``, ``{id}.json`` and
``{id}.txt`` per sample, plus ``SHA256SUMS`` (``sha256sum -c`` checks the folder; its own sha256
is the shard's in the package manifest)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from farm.datasets.rows import Sample

SUMS = "SHA256SUMS"


def write_files(path: Path, samples: Iterable[Sample]) -> int:
    """Write the samples as files in the folder ``path`` (created); returns how many."""
    path.mkdir(parents=True)
    sums: list[str] = []
    count = 0
    for sample in samples:
        for suffix, data in (
            (sample.ext, sample.image),
            ("json", sample.metadata_json()),
            ("txt", sample.caption.encode()),
        ):
            name = f"{sample.name}.{suffix}"
            (path / name).write_bytes(data)
            sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
        count += 1
    (path / SUMS).write_text("".join(sorted(sums, key=lambda line: line[66:])))
    return count
