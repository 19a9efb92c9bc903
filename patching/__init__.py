"""Standalone patch library for diffusers models (never imports ``farm``, ``tasks`` or ``storage``).

- :mod:`patching.patcher`: :class:`ModelPatcher`, :class:`Patch`, :class:`PatchHandle`, fingerprints.
- :mod:`patching.blocks`: ComfyUI block keys <-> diffusers module paths (SD1.x, SDXL, SVD).
- :mod:`patching.state`: :class:`StepState`, the per-step information processors read.
- :mod:`patching.attention_multiply`: the four attention-multiplier weight patches.

Importing the package does not import torch; the patch code imports it when it runs.
"""

from patching.attention_multiply import (
    MULTIPLIERS,
    CLIPAttentionMultiply,
    UNetCrossAttentionMultiply,
    UNetSelfAttentionMultiply,
    UNetTemporalAttentionMultiply,
)
from patching.blocks import attention_paths, attention_sites, block_key_of
from patching.errors import PatchError
from patching.patcher import ModelPatcher, Patch, PatchContext, PatchHandle, fingerprint
from patching.state import StepState

__all__ = [
    "MULTIPLIERS",
    "CLIPAttentionMultiply",
    "ModelPatcher",
    "Patch",
    "PatchContext",
    "PatchError",
    "PatchHandle",
    "StepState",
    "UNetCrossAttentionMultiply",
    "UNetSelfAttentionMultiply",
    "UNetTemporalAttentionMultiply",
    "attention_paths",
    "attention_sites",
    "block_key_of",
    "fingerprint",
]
