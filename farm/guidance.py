"""Job-level guidance options: ``sag: {scale, blur_sigma}`` (Self-Attention Guidance).

Image and face-identity jobs may add ``sag``; the worker applies it after the job's own patches
and the identity patches (:func:`guidance_patches`), so it composes with IP-Adapter, InstantID
and the attention multipliers in one set. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SelfAttentionGuidanceSpec(BaseModel):
    """ComfyUI's ``SelfAttentionGuidance`` settings (the seed node's defaults and ranges)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    scale: float = Field(default=0.5, ge=-2.0, le=5.0, description="guidance strength; 0 = off")
    blur_sigma: float = Field(default=2.0, ge=0.0, le=10.0, description="Gaussian blur sigma; 0 = no blur")


def guidance_patches(spec: Any) -> list[Any]:
    """The job's guidance options as :mod:`patching` objects (empty when it has none)."""
    sag = getattr(spec, "sag", None)
    if sag is None:
        return []
    from patching.sag import SelfAttentionGuidance

    return [SelfAttentionGuidance(sag.scale, sag.blur_sigma, negative_prompt=spec.negative_prompt)]
