"""Image projections of IP-Adapter style checkpoints: :class:`ImageProjModel` (plain) and the
Perceiver-style :class:`Resampler` ("plus" adapters, InstantID). Parameter names match the
original checkpoints (``proj``/``norm``; ``latents``, ``proj_in``, ``proj_out``, ``norm_out``,
``layers.{i}.0.*`` attention and ``layers.{i}.1.*`` feed-forward), so ``load_state_dict`` takes
the checkpoint's ``image_proj`` dict as it is (reference ``patch_semantics.md`` 2.2 and 3.2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from patching.errors import PatchError


class ImageProjModel(nn.Module):
    """tokens = LayerNorm(reshape(Linear(embedding), tokens, cross_dim))."""

    def __init__(self, cross_dim: int, embedding_dim: int, tokens: int) -> None:
        super().__init__()
        self.cross_dim, self.tokens = cross_dim, tokens
        self.proj = nn.Linear(embedding_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds).reshape(-1, self.tokens, self.cross_dim)
        return self.norm(tokens)


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs ; latents]; q and k are each pre-scaled by dim_head^-1/4."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        batch, length, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(batch, length, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class Resampler(nn.Module):
    """Learned latent queries refined by ``depth`` (attention, feed-forward) layers."""

    def __init__(
        self,
        dim: int,
        depth: int,
        dim_head: int,
        heads: int,
        num_queries: int,
        embedding_dim: int,
        output_dim: int,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # one embedding per image (InstantID's face vector): a sequence of one
            x = x.unsqueeze(1)
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def projection_from_state_dict(state: dict[str, Any], dim_head: int = 64) -> nn.Module:
    """Build the projection an ``image_proj`` state dict describes and load it: a Resampler when
    it has ``latents`` (heads = inner width / ``dim_head``), else an ImageProjModel."""
    if "latents" in state:
        latents = state["latents"]
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        inner = state["layers.0.0.to_q.weight"].shape[0]
        if inner % dim_head:
            raise PatchError(f"resampler width {inner} is not a multiple of the head width {dim_head}")
        ff_inner = state["layers.0.1.1.weight"].shape[0]
        module: nn.Module = Resampler(
            dim=latents.shape[2],
            depth=depth,
            dim_head=dim_head,
            heads=inner // dim_head,
            num_queries=latents.shape[1],
            embedding_dim=state["proj_in.weight"].shape[1],
            output_dim=state["proj_out.weight"].shape[0],
            ff_mult=ff_inner // latents.shape[2],
        )
    elif "proj.weight" in state and "norm.weight" in state:
        cross = state["norm.weight"].shape[0]
        module = ImageProjModel(cross, state["proj.weight"].shape[1], state["proj.weight"].shape[0] // cross)
    else:
        raise PatchError("image_proj has neither 'latents' (Resampler) nor 'proj'/'norm' (ImageProjModel) weights")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PatchError(f"image_proj weights do not fit: {str(exc).splitlines()[0]}") from None
    return module.eval()
