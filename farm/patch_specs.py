"""Patch types a job spec may list under ``patches``, and their translation to :mod:`patching`.

A patch type is a :class:`PatchSpec` subclass with a ``type: Literal["name"]`` field, registered
with :func:`register_patch_type`; ``families`` says which model families it applies to (checked
at submit). The :data:`Patch` annotation validates one ``patches`` entry by its ``type``.
:func:`build_patches` turns a spec's list into :mod:`patching` objects, in the order given (the
order patches compose in). Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, SerializeAsAny

import patching
from farm.families import FAMILIES
from farm.guidance import guidance_patches
from farm.spec_problems import literal_value, problem, shown

if TYPE_CHECKING:
    from farm.job_spec import JobSpec


class PatchSpec(BaseModel):
    """Base of every patch type. A patch type subclasses this with ``type: Literal["name"]`` and
    its own fields, and is registered with :func:`register_patch_type`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    type: str


PATCH_TYPES: dict[str, type[PatchSpec]] = {}
PatchT = TypeVar("PatchT", bound=type[PatchSpec])


def register_patch_type(model: PatchT) -> PatchT:
    """Accept ``model`` in ``patches`` under its ``type`` literal. Usable as a class decorator."""
    if not (isinstance(model, type) and issubclass(model, PatchSpec)):
        raise TypeError(f"{model!r} is not a PatchSpec subclass")
    name = literal_value(model, "type")
    if PATCH_TYPES.get(name, model) is not model:
        raise TypeError(f"patch type {name!r} is already registered by {PATCH_TYPES[name].__name__}")
    PATCH_TYPES[name] = model
    return model


def known_patch_types() -> list[str]:
    return sorted(PATCH_TYPES)


def _validate_patch(value: Any) -> PatchSpec:
    """Dispatch one ``patches`` entry to its registered model by ``type``."""
    if isinstance(value, PatchSpec) and PATCH_TYPES.get(value.type) is type(value):
        return value
    if not isinstance(value, dict):
        raise problem((), "a patch must be an object with a 'type' field", value)
    known = ", ".join(known_patch_types()) or "none"
    if "type" not in value:
        raise problem(("type",), f"missing; known types: {known}", value)
    name = value["type"]
    model = PATCH_TYPES.get(name) if isinstance(name, str) else None
    if model is None:
        raise problem(("type",), f"unknown patch type {shown(name)}; known types: {known}", name)
    return model.model_validate(value)


Patch = Annotated[SerializeAsAny[PatchSpec], PlainValidator(_validate_patch)]

Factor = float
FACTOR = {"default": 1.0, "ge": 0.0, "le": 10.0}  # the seed nodes' range


class MultiplierSpec(PatchSpec):
    """Base of the attention multipliers: every field but ``type`` is a factor in 0..10."""

    families: ClassVar[tuple[str, ...]] = FAMILIES
    patch_class: ClassVar[str]

    def to_patch(self) -> Any:

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
