"""Applying a job's patch set to the resident model, reversibly, and only when it changes."""

from __future__ import annotations

from typing import Any

from farm.errors import UserError
from farm.patch_specs import build_patches
from patching import ModelPatcher, PatchError


class PatchFailed(UserError):
    """The job's patches cannot be applied to its model (a user error: fix the spec)."""


def apply_job_patches(loaded: Any, spec: Any, extra: list[Any] | tuple[Any, ...] = ()) -> str:
    """Make the job's patch set (then ``extra``, patches a runner builds itself) the one applied
    to the resident model: a no-op when the last job used the same set. Returns its fingerprint."""
    if loaded.patcher is None:
        loaded.patcher = ModelPatcher(loaded.pipeline)
    try:
        loaded.patcher.ensure(build_patches(spec, extra))
    except PatchError as exc:
        raise PatchFailed(f"patches: {exc}") from None
    return loaded.patcher.fingerprint
