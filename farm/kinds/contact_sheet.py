"""The ``contact_sheet`` step: the source job's contact sheet drawn again from its outputs as they
are now (the same layout the finalizer draws: :func:`farm.manifest.contact_sheet`), as a PNG
beside them; every image it shows is checked against its sha256. The runner is
:mod:`farm.worker.kinds.contact_sheet`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from farm.kinds.base import ShardRunner
from farm.kinds.step import StepSpec, step_kind


class ContactSheetSpec(StepSpec):
    """A labelled grid of ``source_job``'s images."""

    kind: Literal["contact_sheet"] = "contact_sheet"
    title: str | None = Field(default=None, min_length=1, max_length=200, description="default: the source's title")


def runner() -> ShardRunner:
    from farm.worker.kinds.contact_sheet import run_contact_sheet_shard  # worker side

    return run_contact_sheet_shard


KIND = step_kind(ContactSheetSpec, runner)
