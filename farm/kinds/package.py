"""The ``package`` step: the source job's images as a dataset package (the writers of
:mod:`farm.datasets`: WebDataset tar or Parquet), ``samples_per_file`` samples per file, beside
the source's outputs. Each image is checked against its sha256 as it is read. The runner is
:mod:`farm.worker.kinds.package`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from farm.kinds.base import ShardRunner
from farm.kinds.step import StepSpec, step_kind


class PackageSpec(StepSpec):
    """``source_job``'s images as WebDataset tar files or Parquet files."""

    kind: Literal["package"] = "package"
    format: Literal["webdataset", "parquet"] = "webdataset"
    samples_per_file: int = Field(default=1000, ge=1, le=100_000, description="samples per tar or parquet file")


def runner() -> ShardRunner:
    from farm.worker.kinds.package import run_package_shard  # worker side

    return run_package_shard


KIND = step_kind(PackageSpec, runner)
