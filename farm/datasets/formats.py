"""The package formats: each one's name, its shards' suffix and its writer (one shard to a local
path). ``farm bulk package`` (:mod:`farm.datasets.package`) and the ``package`` step
(:mod:`farm.worker.kinds.package`) write through them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from farm.datasets.file_shards import write_files
from farm.datasets.parquet_shards import write_parquet
from farm.datasets.rows import Sample
from farm.datasets.tar_shards import write_tar


@dataclass(frozen=True)
class Format:
    """A package format: its shards' suffix (``""``: a folder) and writer."""

    name: str
    suffix: str
    write: Callable[[Path, Iterable[Sample]], int]
    content_type: str = "application/octet-stream"


FORMATS = {
    "webdataset": Format("webdataset", ".tar", write_tar, "application/x-tar"),
    "parquet": Format("parquet", ".parquet", write_parquet, "application/vnd.apache.parquet"),
    "files": Format("files", "", write_files),
}
