"""InstantID's attention patch (seed ``000``, reference ``patch_semantics.md`` section 2).

The InstantID checkpoint has the IP-Adapter layout (a Resampler ``image_proj`` over the 512-d
ArcFace embedding, 16 tokens; ``ip_adapter`` K/V weights keyed 1, 3, 5, ... in diffusers processor
order), so :func:`~patching.ip_adapter.load_ip_adapter` reads it. :class:`InstantIDPatch` applies
it to **every** cross-attention layer, the SDXL middle block's ten included (the upstream node at
HEAD skips those through a ``('middle', 1)`` key; we do not), additively:
``out = Attn(q, K_txt, V_txt) + weight * mask * Attn(q, K_face, V_face)``, active while the
sampling progress is within ``start_at``..``end_at`` (both ends included, on the model's timestep
axis). The mask is shrunk to each layer's token grid ``bicubic`` by default, as the seed node and
diffusers' ``IPAdapterMaskProcessor`` do; ``mask_resize="bilinear"`` follows ComfyUI_InstantID at
HEAD instead (see :mod:`patching.image_prompt_attention`). The uncond face tokens are the
Resampler applied to zeros, or with ``noise > 0`` to ``noise * U[0,1)`` drawn from a generator
seeded by the embedding (floor of its sum mod 1e9+7), so the same face always gets the same noise.
Weight 0 leaves the model unpatched; the face tokens (``FACE_EMBEDS``) are still available from
:meth:`InstantIDPatch.face_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from patching.errors import PatchError
from patching.image_prompt_attention import MASK_RESIZES
from patching.ip_adapter import ImagePrompt, IPAdapter, IPAdapterPatch, tensor_digest
from patching.patcher import Patch, PatchContext

COMBINES = ("average", "norm_average", "concat")
NOISE_MODULUS = 1_000_000_007


def combine_embeddings(embeds: torch.Tensor, combine: str = "average") -> torch.Tensor:
    """One reference embedding from N face embeddings ``(N, 512)``: ``average`` (mean),
    ``norm_average`` (each dimension divided by its norm across the images, then the mean) or
    ``concat`` (all N as a token sequence for the Resampler). Returns ``(1, 512)`` or ``(1, N, 512)``."""
    if embeds.ndim != 2 or embeds.shape[0] == 0:
        raise PatchError(f"face embeddings must be (N, D) with N >= 1, got {tuple(embeds.shape)}")
    if combine == "average":
        return embeds.mean(dim=0, keepdim=True)
    if combine == "norm_average":
        return (embeds / embeds.norm(dim=0, keepdim=True).clamp_min(1e-12)).mean(dim=0, keepdim=True)
    if combine == "concat":
        return embeds.unsqueeze(0)
    raise PatchError(f"combine {combine!r}: expected one of {', '.join(COMBINES)}")


def uncond_embedding(embedding: torch.Tensor, noise: float) -> torch.Tensor:
    """Zeros, or ``noise * U[0,1)`` from a generator seeded by the embedding itself."""
    if noise <= 0:
        return torch.zeros_like(embedding)
    seed = int(torch.sum(embedding.float()).item()) % NOISE_MODULUS
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draw = torch.rand(embedding.shape, generator=generator, dtype=torch.float32)
    return (noise * draw).to(device=embedding.device, dtype=embedding.dtype)


@dataclass(frozen=True, eq=False)
class InstantIDPatch(Patch):
    """The seed node's parameters: weight -1..3 (default 1), start_at/end_at 0..1, noise 0..1,
    optional mask (H, W) gating the identity branch only, shrunk to each layer's token grid by
    ``mask_resize`` (``bicubic``: the seed node and diffusers; ``bilinear``: the node at HEAD)."""

    name: ClassVar[str] = "instantid"
    adapter: IPAdapter
    face_embeds: torch.Tensor  # (N, 512) raw ArcFace embeddings of the reference faces
    weight: float = 1.0
    start_at: float = 0.0
    end_at: float = 1.0
    noise: float = 0.0
    combine: str = "average"
    mask: torch.Tensor | None = None
    mask_resize: str = "bicubic"

    def __post_init__(self) -> None:
        if not -1.0 <= self.weight <= 3.0:
            raise PatchError(f"instantid.weight {self.weight} is outside -1..3")
        if not 0.0 <= self.start_at <= self.end_at <= 1.0:
            raise PatchError(f"instantid window {self.start_at}..{self.end_at}: need 0 <= start_at <= end_at <= 1")
        if not 0.0 <= self.noise <= 1.0:
            raise PatchError(f"instantid.noise {self.noise} is outside 0..1")
        if self.mask_resize not in MASK_RESIZES:
            raise PatchError(f"instantid.mask_resize {self.mask_resize!r}: expected one of {', '.join(MASK_RESIZES)}")
        if not self.adapter.plus:
            raise PatchError("an InstantID checkpoint has a Resampler image_proj (with 'latents'); this one has not")

    def params(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.digest,
            "face_embeds": tensor_digest(self.face_embeds),
            "weight": self.weight,
            "start_at": self.start_at,
            "end_at": self.end_at,
            "noise": self.noise,
            "combine": self.combine,
            "mask": tensor_digest(self.mask),
            "mask_resize": self.mask_resize,
        }

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) embeddings fed to the Resampler."""
        cond = combine_embeddings(self.face_embeds, self.combine)
        return cond, uncond_embedding(cond, self.noise)

    def face_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``FACE_EMBEDS``: the cond and uncond face tokens ``(1, 16, context)`` (IdentityNet's
        encoder hidden states)."""
        cond, uncond = self.embeddings()
        return self.adapter.project(cond), self.adapter.project(uncond)

    def apply(self, ctx: PatchContext) -> None:
        if self.weight == 0.0:
            return  # the seed node returns the model unpatched
        cond, uncond = self.embeddings()
        prompt = ImagePrompt(
            cond,
            weight=self.weight,
            start=self.start_at,
            stop=self.end_at,
            mask=self.mask,
            mask_resize=self.mask_resize,
            uncond_embeds=uncond,
            stop_inclusive=True,
        )
        IPAdapterPatch(self.adapter, (prompt,), mode="additive").apply(ctx)


@dataclass(frozen=True, eq=False)
class IdentityNetTokens(Patch):
    """IdentityNet: an SDXL ControlNet whose encoder hidden states are the face tokens (no text).
    A forward pre-hook on ``controlnet`` swaps its ``encoder_hidden_states`` for the uncond / cond
    face tokens laid out like the batch; the keypoint image, strength and start/end are the
    ControlNet pipeline's own arguments."""

    name: ClassVar[str] = "identitynet_tokens"
    controlnet: Any
    cond_tokens: torch.Tensor  # (1, T, C)
    uncond_tokens: torch.Tensor

    def params(self) -> dict[str, Any]:
        config = dict(getattr(self.controlnet, "config", {}) or {})
        return {
            "controlnet": {k: v for k, v in sorted(config.items()) if isinstance(v, int | float | str | bool)},
            "cond": tensor_digest(self.cond_tokens),
            "uncond": tensor_digest(self.uncond_tokens),
        }

    def apply(self, ctx: PatchContext) -> None:
        width = getattr(getattr(self.controlnet, "config", None), "cross_attention_dim", None)
        if width is not None and width != self.cond_tokens.shape[-1]:
            raise PatchError(
                f"the ControlNet takes {width}-wide context; the face tokens are {self.cond_tokens.shape[-1]}"
            )
        state = ctx.state
        cond, uncond = self.cond_tokens, self.uncond_tokens

        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
            state.update(timestep, sample, state.pipeline_ref())
            chunks = state.cond_or_uncond or [0]
            per_chunk = sample.shape[0] // len(chunks)
            tokens = torch.cat([(uncond if c else cond).expand(per_chunk, -1, -1) for c in chunks])
            tokens = tokens.to(device=sample.device, dtype=sample.dtype)
            if len(args) > 2:  # passed positionally: (sample, timestep, encoder_hidden_states, ...)
                return (*args[:2], tokens, *args[3:]), kwargs
            return args, {**kwargs, "encoder_hidden_states": tokens}

        def install() -> Any:
            return self.controlnet.register_forward_pre_hook(hook, with_kwargs=True).remove

        ctx.install(install)
