"""Cross-attention with image-prompt tokens: the processor behind IP-Adapter and InstantID.

Each :class:`ImagePromptBranch` holds one image prompt's keys and values for one layer (already
projected through that layer's ``to_k_ip``/``to_v_ip``), for the cond and the uncond half of the
batch, with its weight, its active window and an optional mask. Two ways to combine them
(reference ``patch_semantics.md`` 3.5 and 7):

- ``additive`` (IP-Adapter, InstantID): ``out = Attn(q, K_txt, V_txt) + sum_i w_i * mask_i *
  Attn(q, K_i, V_i)``; a branch with weight 0 is skipped, as diffusers does.
- ``fooocus``: the image tokens join the text tokens in one softmax, with ``K_i * W`` and the
  token-mean of ``V_i`` rescaled to ``W * mean`` where ``W = w_i * C / 1280`` (the channel
  penalty). Weight 0 is *not* a no-op there: the tokens keep softmax mass (logits 0).

A mask gates one additive branch per spatial token. It is resized to each layer's token grid
(the latent's exact downsampled grid) with ``F.interpolate`` in one of :data:`MASK_RESIZES`:

- ``bicubic`` (default): what diffusers' ``IPAdapterMaskProcessor.downsample`` and the seed
  version of ComfyUI_InstantID compute (reference ``patch_semantics.md`` 2.5 and 7), overshoot
  included: next to an edge that falls between grid cells the resized mask dips below 0 or
  rises above 1 (by up to 9%), and the branch is scaled by exactly that, as diffusers does.
- ``bilinear``: what ComfyUI_InstantID computes since it switched (HEAD); stays within 0..1. For
  reproducing renders made with that node.

Both agree on masks whose edges fall on the grid (and on constant masks). An all-ones mask is
no mask and an all-zeros mask no branch (:class:`patching.ip_adapter.IPAdapterPatch`), so those
give the unmasked and the unpatched output bit for bit.

A branch is active while ``start <= progress < stop`` (``<= stop`` for InstantID's window;
progress = 1 - t/(T-1), read from the patcher's :class:`~patching.state.StepState`; ``stop >= 1``
means to the end). With no active
branch the processor hands the call to the processor it replaced, so the output is that
processor's, bit for bit. Processors of several patches on one layer merge their branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from patching.state import COND, StepState

MODES = ("additive", "fooocus")
MASK_RESIZES = ("bicubic", "bilinear")  # see the module docstring; bicubic is the default


@dataclass(frozen=True, eq=False)
class ImagePromptBranch:
    cond_keys: torch.Tensor  # (T, C): this layer's keys for the image prompt
    cond_values: torch.Tensor
    uncond_keys: torch.Tensor  # (T, C): the same for the uncond half (negative / zero embedding)
    uncond_values: torch.Tensor
    weight: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    mode: str = "additive"
    mask: torch.Tensor | None = None  # (H, W) in 0..1, additive only
    mask_resize: str = "bicubic"  # one of MASK_RESIZES: how the mask shrinks to a layer's grid
    stop_inclusive: bool = False  # InstantID's sigma window includes its end; Fooocus' stop does not

    def active(self, state: StepState) -> bool:
        if self.mode == "additive" and self.weight == 0.0:
            return False
        progress = state.percent
        if progress is None:
            return True
        before_stop = progress <= self.stop if self.stop_inclusive else progress < self.stop
        return self.start <= progress and (before_stop or self.stop >= 1.0)

    def batch(self, state: StepState, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values laid out like the batch: one chunk per cond/uncond entry."""
        chunks = state.cond_or_uncond or [COND]
        if batch_size % len(chunks):
            chunks = [COND]
        per_chunk = batch_size // len(chunks)
        keys = [self.cond_keys if c == COND else self.uncond_keys for c in chunks]
        values = [self.cond_values if c == COND else self.uncond_values for c in chunks]
        k = torch.stack(keys).repeat_interleave(per_chunk, dim=0)
        v = torch.stack(values).repeat_interleave(per_chunk, dim=0)
        return k.to(dtype), v.to(dtype)

    def token_mask(self, grid: tuple[int, int]) -> torch.Tensor:
        """The mask on a ``grid`` of tokens, ``(1, h*w, 1)`` in float32: ``F.interpolate`` in
        ``mask_resize`` mode (align_corners False, no antialias, no clamping), as diffusers and
        ComfyUI_InstantID do."""
        if self.mask is None:
            raise ValueError("this branch has no mask")
        h, w = grid
        resized = F.interpolate(self.mask[None, None].float(), size=(h, w), mode=self.mask_resize)
        return resized.reshape(1, h * w, 1)


def _grid(state: StepState, tokens: int) -> tuple[int, int]:
    """The (h, w) token grid of a layer with ``tokens`` positions, from the latent's size: the
    exact downsampled grid (ceil at every halving), not a guess from the aspect ratio."""
    if state.latent_size is not None:
        h, w = state.latent_size
        for _ in range(8):
            if h * w == tokens:
                return h, w
            h, w = -(-h // 2), -(-w // 2)
    side = max(1, round(tokens**0.5))
    return side, tokens // side


class ImagePromptAttnProcessor:
    """A diffusers attention processor for attn2 layers carrying image-prompt branches."""

    def __init__(self, previous: Any, branches: list[ImagePromptBranch], state: StepState) -> None:
        if isinstance(previous, ImagePromptAttnProcessor):  # merge with an earlier image prompt patch
            branches = previous.branches + branches
            previous = previous.previous
        self.previous, self.branches, self.state = previous, branches, state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        active = [b for b in self.branches if b.active(self.state)] if encoder_hidden_states is not None else []
        if not active:
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        joint = [b for b in active if b.mode == "fooocus"]
        if joint:
            penalty = inner_dim / 1280.0
            extra_k, extra_v = [key], [value]
            for branch in joint:
                k, v = branch.batch(self.state, batch_size, key.dtype)
                w = branch.weight * penalty
                mean = v.mean(dim=1, keepdim=True)
                extra_k.append(k * w)
                extra_v.append(v - mean + mean * w)
            key, value = torch.cat(extra_k, dim=1), torch.cat(extra_v, dim=1)
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (0, key.shape[1] - attention_mask.shape[-1]))

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        out = F.scaled_dot_product_attention(query, heads(key), heads(value), attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        for branch in active:
            if branch.mode != "additive":
                continue
            k, v = branch.batch(self.state, batch_size, query.dtype)
            extra = F.scaled_dot_product_attention(query, heads(k), heads(v))
            extra = extra.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            if branch.mask is not None:
                extra = extra * branch.token_mask(_grid(self.state, extra.shape[1])).to(extra)
            out = out + branch.weight * extra

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
