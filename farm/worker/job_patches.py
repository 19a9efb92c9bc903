"""Applying a job's patch set and LoRA stack to the resident model, reversibly, and only when
they change.

The order keeps every change reversible: when the LoRA stack changes, the applied patch set is
removed first (it restores the weights and processors it changed), the stack is switched
(:mod:`farm.worker.lora_stack`), and the job's patches are applied over it. A multiplier then
scales a projection with its LoRA branch, ``(W + dW) * f`` as ComfyUI computes it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from farm.errors import UserError
from farm.patch_specs import build_patches
from farm.worker.lora_stack import adapters_of, setting_capacity, stack_fingerprint
from patching import ModelPatcher, PatchError


class PatchFailed(UserError):
    """The job's patches cannot be applied to its model (a user error: fix the spec)."""


def apply_job_patches(loaded: Any, spec: Any, extra: list[Any] | tuple[Any, ...] = (), res: Any = None) -> str:
    """Make the job's LoRA stack and patch set (then ``extra``, patches a runner builds itself)
    the ones applied to the resident model: a no-op when the last job used the same. Returns
    their fingerprint (that of the patch set alone when the job has no LoRAs)."""
    if loaded.patcher is None:
        loaded.patcher = ModelPatcher(loaded.pipeline)
    loras = getattr(spec, "loras", None) or []
    if loras or loaded.loras is not None:
        adapters = adapters_of(loaded, setting_capacity(res))
        stack = adapters.resolve(loras, res)
        if adapters.fingerprint != stack_fingerprint(stack):
            loaded.patcher.remove()  # patches go back on over the new stack
            adapters.switch(stack)
    try:
        loaded.patcher.ensure(build_patches(spec, extra))
    except PatchError as exc:
        raise PatchFailed(f"patches: {exc}") from None
    if not loras:
        return loaded.patcher.fingerprint
    described = {"patches": loaded.patcher.fingerprint, "loras": loaded.loras.fingerprint}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
