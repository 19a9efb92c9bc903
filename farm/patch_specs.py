"""Patch types a job spec may list under ``patches``, and their translation to :mod:`patching`.

Each type is a :class:`~farm.specs.PatchSpec` registered with
:func:`~farm.specs.register_patch_type`; ``families`` says which model families it applies to
(checked at submit). :func:`build_patches` turns a spec's list into :mod:`patching` objects, in
the order given (the order patches compose in). Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.guidance import guidance_patches
from farm.specs import FAMILIES, JobSpec, PatchSpec, register_patch_type

Factor = float
FACTOR = {"default": 1.0, "ge": 0.0, "le": 10.0}  # the seed nodes' range


class MultiplierSpec(PatchSpec):
    """Base of the attention multipliers: every field but ``type`` is a factor in 0..10."""

    families: ClassVar[tuple[str, ...]] = FAMILIES
    patch_class: ClassVar[str]

    def to_patch(self) -> Any:
        import patching

        settings = self.model_dump(exclude={"type"})
        return getattr(patching, self.patch_class)(**settings)


class ProjectionFactorsSpec(MultiplierSpec):
    """q, k, v, out factors (the self, cross and CLIP multipliers)."""

    q: Factor = Field(**FACTOR)
    k: Factor = Field(**FACTOR)
    v: Factor = Field(**FACTOR)
    out: Factor = Field(**FACTOR)


@register_patch_type
class SelfAttentionMultiplySpec(ProjectionFactorsSpec):
    """``UNetSelfAttentionMultiply``: scale attn1 q, k, v, out of every UNet layer."""

    patch_class: ClassVar[str] = "UNetSelfAttentionMultiply"
    type: Literal["unet_self_attention_multiply"]


@register_patch_type
class CrossAttentionMultiplySpec(ProjectionFactorsSpec):
    """``UNetCrossAttentionMultiply``: scale attn2 q, k, v, out of every UNet layer."""

    patch_class: ClassVar[str] = "UNetCrossAttentionMultiply"
    type: Literal["unet_cross_attention_multiply"]


@register_patch_type
class CLIPAttentionMultiplySpec(ProjectionFactorsSpec):
    """``CLIPAttentionMultiply``: scale the text encoders' self-attention projections."""

    families: ClassVar[tuple[str, ...]] = ("sd15", "sdxl")  # SVD has no text encoder
    patch_class: ClassVar[str] = "CLIPAttentionMultiply"
    type: Literal["clip_attention_multiply"]


@register_patch_type
class TemporalAttentionMultiplySpec(MultiplierSpec):
    """``UNetTemporalAttentionMultiply``: scale attention outputs, spatial vs temporal layers."""

    patch_class: ClassVar[str] = "UNetTemporalAttentionMultiply"
    type: Literal["unet_temporal_attention_multiply"]
    self_structural: Factor = Field(**FACTOR)
    self_temporal: Factor = Field(**FACTOR)
    cross_structural: Factor = Field(**FACTOR)
    cross_temporal: Factor = Field(**FACTOR)


def build_patches(spec: JobSpec, extra: list[Any] | tuple[Any, ...] = ()) -> list[Any]:
    """The set a job's shard runs with, as :mod:`patching` objects: the spec's ``patches`` in
    order, then ``extra`` (patches a runner builds, e.g. the identity), then the guidance options
    (``sag``)."""
    return [*(patch.to_patch() for patch in spec.patches), *extra, *guidance_patches(spec)]
