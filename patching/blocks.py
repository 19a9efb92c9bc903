"""ComfyUI block keys <-> diffusers module paths, computed from the UNet itself.

ComfyUI addresses an attention layer by ``(block, number[, transformer_index])``: ``block`` is
``"input"``, ``"middle"`` or ``"output"``; ``number`` indexes ``input_blocks`` (0 is ``conv_in``),
the middle block (always 0) or ``output_blocks``; the optional third element is the index in the
site's ``transformer_blocks``. A two-element key means every transformer block of that site.

The numbering follows the UNet's layout (reference ``patch_semantics.md`` section 6.2): each down
block contributes one input block per resnet plus one for its downsampler; each up block one output
block per resnet (its upsampler rides in the last). It is derived from the modules, so SD1.x
(``('input', 1)`` -> ``down_blocks.0.attentions.0``), SDXL (``('input', 4, 1)`` ->
``down_blocks.1.attentions.0.transformer_blocks.1``), the SVD UNet and tiny test configs all map
correctly. SVD sites also hold ``temporal_transformer_blocks``; those are reached with
``temporal=True`` (ComfyUI's ``time_stack``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from patching.errors import PatchError

BLOCK_KINDS = ("input", "middle", "output")
ATTENTIONS = ("attn1", "attn2")
BlockKey = tuple[str, int] | tuple[str, int, int]


@dataclass(frozen=True)
class AttentionSite:
    """One transformer site (a ``Transformer2DModel`` or its spatio-temporal sibling)."""

    key: tuple[str, int]  # ComfyUI (block, number)
    path: str  # diffusers path of the site, e.g. "down_blocks.1.attentions.0"
    transformer_blocks: int
    temporal_blocks: int  # 0 unless the site is spatio-temporal (SVD)


def attention_sites(unet: Any) -> dict[tuple[str, int], AttentionSite]:
    """Every site with attention, keyed by ComfyUI ``(block, number)``, in ComfyUI order."""
    sites: dict[tuple[str, int], AttentionSite] = {}
    number = 1  # input block 0 is conv_in
    for x, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(block.resnets)):
            if i < len(attentions):
                sites[("input", number)] = _site(("input", number), f"down_blocks.{x}.attentions.{i}", attentions[i])
            number += 1
        if getattr(block, "downsamplers", None):
            number += 1
    mid = getattr(unet, "mid_block", None)
    for i, site in enumerate(getattr(mid, "attentions", None) or []):
        if i == 0:  # ComfyUI has one middle site
            sites[("middle", 0)] = _site(("middle", 0), f"mid_block.attentions.{i}", site)
    number = 0
    for x, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(block.resnets)):
            if i < len(attentions):
                sites[("output", number)] = _site(("output", number), f"up_blocks.{x}.attentions.{i}", attentions[i])
            number += 1
    return sites


def _site(key: tuple[str, int], path: str, module: Any) -> AttentionSite:
    spatial = len(getattr(module, "transformer_blocks", None) or [])
    temporal = len(getattr(module, "temporal_transformer_blocks", None) or [])
    return AttentionSite(key, path, spatial, temporal)


def parse_block_key(key: Iterable[Any]) -> BlockKey:
    """Validate a block key given as a tuple or list (JSON has no tuples)."""
    parts = tuple(key)
    if len(parts) not in (2, 3) or parts[0] not in BLOCK_KINDS:
        raise PatchError(f"block key {parts!r}: expected (input|middle|output, number[, transformer_index])")
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts[1:]):
        raise PatchError(f"block key {parts!r}: number and transformer index must be non-negative integers")
    return parts  # type: ignore[return-value]


def attention_paths(unet: Any, key: Iterable[Any], attn: str = "attn2", *, temporal: bool = False) -> list[str]:
    """diffusers module paths of the ``attn`` layers a block key addresses (one, or every
    transformer block of the site for a two-element key). Raises :class:`PatchError` naming the
    keys this UNet has when ``key`` does not exist."""
    if attn not in ATTENTIONS:
        raise PatchError(f"attention {attn!r}: expected attn1 (self) or attn2 (cross)")
    block_key = parse_block_key(key)
    sites = attention_sites(unet)
    site = sites.get(block_key[:2])  # type: ignore[arg-type]
    if site is None:
        known = ", ".join(f"({kind!r}, {n})" for kind, n in sites)
        raise PatchError(f"block {block_key!r} has no attention in this {type(unet).__name__}; it has {known}")
    stack, count = (
        ("temporal_transformer_blocks", site.temporal_blocks)
        if temporal
        else ("transformer_blocks", site.transformer_blocks)
    )
    if count == 0:
        raise PatchError(f"block {block_key!r} has no {stack} in this {type(unet).__name__}")
    indexes = range(count) if len(block_key) == 2 else [block_key[2]]  # type: ignore[misc]
    if indexes[-1] >= count:
        raise PatchError(f"block {block_key!r}: transformer index out of range; this site has {stack} 0..{count - 1}")
    return [f"{site.path}.{stack}.{t}.{attn}" for t in indexes]


def block_key_of(unet: Any, path: str) -> BlockKey | None:
    """The ComfyUI key ``(block, number, transformer_index)`` of a diffusers attention path such
    as ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``; ``None`` if it is not one."""
    for key, site in attention_sites(unet).items():
        for stack in ("transformer_blocks", "temporal_transformer_blocks"):
            prefix = f"{site.path}.{stack}."
            if path.startswith(prefix):
                index = path[len(prefix) :].split(".", 1)[0]
                if index.isdigit():
                    return (key[0], key[1], int(index))
    return None
