"""Attention multipliers: ComfyUI's ``UNet{Self,Cross,Temporal}AttentionMultiply`` and
``CLIPAttentionMultiply`` as weight patches (reference ``patch_semantics.md`` section 5).

Each scales the weight and bias of attention projections: ``W <- f * W``. Scaling ``to_out.0``
by f scales the whole attention branch; ``to_q`` scales the logits; ``to_v`` the values. Factors
are 0..10 (default 1.0, which changes nothing). The UNet nodes match every attention of the
UNet, spatial and temporal alike; the temporal node splits ``to_out.0`` of ``attn1``/``attn2``
by whether the layer sits under ``temporal_transformer_blocks`` (ComfyUI's ``time_stack``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import ClassVar

from patching.errors import PatchError
from patching.patcher import Patch, PatchContext

MIN_FACTOR, MAX_FACTOR = 0.0, 10.0
_UNET_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
_CLIP_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
TEMPORAL_MARKER = ".temporal_transformer_blocks."
_LORA_B = re.compile(r"\.lora_B\.[^.]+\.weight$")


def projection_parameters(ctx: PatchContext, component: str) -> Iterator[tuple[str, str]]:
    """``(name as in the plain model, actual name)`` of a component's parameters. A projection
    wrapped by a PEFT LoRA layer keeps its own weight and bias under ``base_layer`` and its LoRA
    branches' output matrices under ``lora_B.<adapter>``: scaling those too scales the projection
    with its LoRAs, ``(W + dW) * f`` as ComfyUI computes a multiplier over a LoRA."""
    for name in ctx.parameter_names(component):
        plain = _LORA_B.sub(".weight", name.replace(".base_layer.", "."))
        if ".lora_" not in name or _LORA_B.search(name):  # not the LoRA A matrices
            yield plain, name


class _Factors(Patch):
    """Checks every float field is a factor in 0..10."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise PatchError(f"{self.name}.{f.name}: expected a number, got {value!r}")
            if not MIN_FACTOR <= value <= MAX_FACTOR:
                raise PatchError(f"{self.name}.{f.name}: {value} is outside {MIN_FACTOR:g}..{MAX_FACTOR:g}")


def _multiply_projections(
    ctx: PatchContext, component: str, owner: str, projections: dict[str, str], factors: dict[str, float]
) -> int:
    """Multiply weight and bias of ``{owner}.{projection}`` in ``component`` by the projection's
    factor; returns how many parameters matched."""
    matched = 0
    for plain, name in projection_parameters(ctx, component):
        for short, projection in projections.items():
            if plain.endswith((f".{owner}.{projection}.weight", f".{owner}.{projection}.bias")):
                ctx.multiply(name, factors[short])
                matched += 1
    return matched


@dataclass(frozen=True)
class _UNetProjections(_Factors):
    """q, k, v, out factors for the ``attn`` layers of every UNet transformer block."""

    attn: ClassVar[str]
    q: float = 1.0
    k: float = 1.0
    v: float = 1.0
    out: float = 1.0

    def apply(self, ctx: PatchContext) -> None:
        factors = {"q": self.q, "k": self.k, "v": self.v, "out": self.out}
        if not _multiply_projections(ctx, "unet", self.attn, _UNET_PROJECTIONS, factors):
            raise PatchError(f"{self.name}: the UNet has no {self.attn} layers")


@dataclass(frozen=True)
class UNetSelfAttentionMultiply(_UNetProjections):
    """Scale ``attn1`` (self-attention) q, k, v and out projections of every UNet layer."""

    name: ClassVar[str] = "unet_self_attention_multiply"
    attn: ClassVar[str] = "attn1"


@dataclass(frozen=True)
class UNetCrossAttentionMultiply(_UNetProjections):
    """Scale ``attn2`` (cross-attention) q, k, v and out projections of every UNet layer."""

    name: ClassVar[str] = "unet_cross_attention_multiply"
    attn: ClassVar[str] = "attn2"


@dataclass(frozen=True)
class UNetTemporalAttentionMultiply(_Factors):
    """Scale ``to_out.0`` of attn1/attn2, separately for spatial ("structural") and temporal
    layers. On a UNet without temporal layers only the structural factors act."""

    name: ClassVar[str] = "unet_temporal_attention_multiply"
    self_structural: float = 1.0
    self_temporal: float = 1.0
    cross_structural: float = 1.0
    cross_temporal: float = 1.0

    def apply(self, ctx: PatchContext) -> None:
        matched = 0
        for plain, name in projection_parameters(ctx, "unet"):
            temporal = TEMPORAL_MARKER in name
            for attn, structural, temporal_factor in (
                ("attn1", self.self_structural, self.self_temporal),
                ("attn2", self.cross_structural, self.cross_temporal),
            ):
                if plain.endswith((f".{attn}.to_out.0.weight", f".{attn}.to_out.0.bias")):
                    ctx.multiply(name, temporal_factor if temporal else structural)
                    matched += 1
        if not matched:
            raise PatchError(f"{self.name}: the UNet has no attention output projections")


@dataclass(frozen=True)
class CLIPAttentionMultiply(_Factors):
    """Scale q, k, v and out projections of every self-attention of the text encoder(s)
    (``text_encoder`` and, for SDXL, ``text_encoder_2``)."""

    name: ClassVar[str] = "clip_attention_multiply"
    q: float = 1.0
    k: float = 1.0
    v: float = 1.0
    out: float = 1.0

    def apply(self, ctx: PatchContext) -> None:
        encoders = [c for c in ctx.components if c.startswith("text_encoder")]
        if not encoders:
            raise PatchError(f"{self.name}: this model has no text encoder")
        factors = {"q": self.q, "k": self.k, "v": self.v, "out": self.out}
        for component in encoders:
            _multiply_projections(ctx, component, "self_attn", _CLIP_PROJECTIONS, factors)


MULTIPLIERS: dict[str, type[Patch]] = {
    cls.name: cls
    for cls in (
        UNetSelfAttentionMultiply,
        UNetCrossAttentionMultiply,
        UNetTemporalAttentionMultiply,
        CLIPAttentionMultiply,
    )
}
