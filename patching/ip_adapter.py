"""IP-Adapter: checkpoints, image encoding, and the image-prompt patch (reference
``patch_semantics.md`` sections 3 and 7; seed ``001``).

- :func:`load_ip_adapter` reads a checkpoint (``.safetensors`` with flat ``image_proj.*`` /
  ``ip_adapter.*`` keys, or a ``.bin`` of nested dicts read with ``weights_only=True``), detects
  plain vs plus (``image_proj.latents``), the context width and the token count, and returns an
  :class:`IPAdapter` holding the projection and the per-layer K/V weights (keys 1, 3, 5, ...).
- :func:`clip_pixels` / :func:`encode_images` turn PIL images into the embeddings the adapter
  expects (CLIP 224x224, mean/std; ``stretch`` as Fooocus or ``center`` crop as CLIPImageProcessor;
  plus adapters take the penultimate hidden states, plain ones the projected image embedding).
- :class:`IPAdapterPatch` maps the K/V weights onto the UNet's cross-attention layers in
  diffusers processor order (down, up, mid) and installs :class:`ImagePromptAttnProcessor`
  branches: several image prompts, each with weight, start/stop and (additive) mask, resized to
  each layer's token grid ``bicubic`` (diffusers, the seed) or ``bilinear`` (ComfyUI_InstantID
  HEAD); see :mod:`patching.image_prompt_attention`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # to recognise the weights_only refusal; nothing is unpickled with it
from typing import Any, ClassVar

import torch

from patching.errors import PatchError
from patching.image_prompt_attention import MASK_RESIZES, MODES, ImagePromptAttnProcessor, ImagePromptBranch
from patching.patcher import Patch, PatchContext

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
CROPS = ("stretch", "center")


def read_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a safetensors or ``.bin`` file. A
    ``.bin`` is read with ``torch.load(weights_only=True)``: pickled code is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise PatchError(f"IP-Adapter checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
            nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            for key, tensor in flat.items():
                group, _, rest = key.partition(".")
                if group in nested:
                    nested[group][rest] = tensor
        elif path.suffix in (".bin", ".pt", ".pth"):
            nested = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise PatchError(f"{path.name}: expected a .safetensors or .bin IP-Adapter checkpoint")
    except PatchError:
        raise
    except UnpicklingError as exc:  # weights_only refused a global: code or a foreign object
        found = _UNPICKLER_DETAIL.search(str(exc))
        detail = f" ({_printable(found.group(1))[:160]})" if found else ""
        raise PatchError(
            f"{path.name} is not a loadable IP-Adapter checkpoint: refused, it holds pickled code or objects "
            f"other than tensors{detail}; nothing in it was run (use a .safetensors file)"
        ) from None
    except Exception as exc:  # corrupt or truncated
        first = (_printable(str(exc)).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PatchError(f"{path.name} is not a loadable IP-Adapter checkpoint: {first}") from None
    if not isinstance(nested, dict) or not isinstance(nested.get("image_proj"), dict) or not nested.get("ip_adapter"):
        raise PatchError(f"{path.name}: no 'image_proj' and 'ip_adapter' weights (not an IP-Adapter checkpoint)")
    for group in ("image_proj", "ip_adapter"):
        weights = nested[group]
        if not isinstance(weights, dict):
            raise PatchError(f"{path.name}: '{group}' is a {type(weights).__name__}, not a mapping of tensors")
        for name, value in weights.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise PatchError(
                    f"{path.name}: {group}.{str(name)[:80]} is not a tensor (not an IP-Adapter checkpoint)"
                )
    return nested


# torch's weights_only refusal: a long text with ANSI codes; the part after this names the global.
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\. |\.?$)", re.M)


def _printable(text: str) -> str:
    """``text`` without ANSI escape sequences or other control characters (newlines kept)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return "".join(ch for ch in text if ch == "\n" or (ch.isprintable() and ch != "\x7f"))


@dataclass(eq=False)
class IPAdapter:
    """A loaded IP-Adapter: its projection and, per cross-attention layer, the K and V weights."""

    projection: torch.nn.Module
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (to_k_ip.weight, to_v_ip.weight), key order
    plus: bool
    cross_dim: int
    tokens: int
    digest: str
    name: str = ""

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> IPAdapter:
        self.projection.to(device=device, dtype=dtype)
        self.layers = [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in self.layers]
        return self

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    @torch.no_grad()
    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image-prompt tokens ``(N, tokens, cross_dim)`` for embeddings of N images."""
        parameter = next(self.projection.parameters())
        return self.projection(embeds.to(device=parameter.device, dtype=parameter.dtype))


def load_ip_adapter(path: str | Path) -> IPAdapter:
    from patching.resampler import projection_from_state_dict

    path = Path(path)
    checkpoint = read_checkpoint(path)
    ip = checkpoint["ip_adapter"]
    indexes = sorted(int(k.split(".")[0]) for k in ip if k.endswith(".to_k_ip.weight") and k.split(".")[0].isdigit())
    if not indexes:
        raise PatchError(f"{path.name}: ip_adapter has no '<n>.to_k_ip.weight' entries")
    try:
        layers = [(ip[f"{i}.to_k_ip.weight"], ip[f"{i}.to_v_ip.weight"]) for i in indexes]
    except KeyError as exc:
        raise PatchError(f"{path.name}: ip_adapter is missing {exc.args[0]}") from None
    projection = projection_from_state_dict(checkpoint["image_proj"])
    plus = "latents" in checkpoint["image_proj"]
    cross_dim = int(layers[0][0].shape[1])
    tokens = int(checkpoint["image_proj"]["latents"].shape[1]) if plus else projection.tokens
    out_dim = int(projection.norm_out.weight.shape[0] if plus else projection.norm.weight.shape[0])
    if out_dim != cross_dim:
        raise PatchError(f"{path.name}: image_proj makes {out_dim}-wide tokens but to_k_ip takes {cross_dim}")
    digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
    return IPAdapter(projection, layers, plus, cross_dim, tokens, digest, path.name)


def load_negative(path: str | Path) -> torch.Tensor:
    """Fooocus' negative file: a safetensors tensor ``data`` of context-width tokens, used as the
    uncond image tokens as they are (no projection)."""
    from safetensors.torch import load_file

    try:
        data = load_file(str(path))["data"]
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PatchError(f"negative embedding {Path(path).name}: {first}") from None
    return data.reshape(-1, data.shape[-1])


def clip_pixels(images: list[Any], crop: str = "center") -> torch.Tensor:
    """CLIP input ``(N, 3, 224, 224)``: ``stretch`` resizes to 224x224 (Fooocus), ``center``
    resizes the short side to 224 and crops the middle (CLIPImageProcessor); bicubic."""
    from PIL import Image

    if crop not in CROPS:
        raise PatchError(f"crop {crop!r}: expected one of {', '.join(CROPS)}")
    tensors = []
    for image in images:
        image = image.convert("RGB")
        if crop == "stretch":
            image = image.resize((CLIP_SIZE, CLIP_SIZE), Image.Resampling.BICUBIC)
        else:
            scale = CLIP_SIZE / min(image.size)
            size = (max(CLIP_SIZE, round(image.width * scale)), max(CLIP_SIZE, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (image.width - CLIP_SIZE) // 2, (image.height - CLIP_SIZE) // 2
            image = image.crop((left, top, left + CLIP_SIZE, top + CLIP_SIZE))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(CLIP_SIZE, CLIP_SIZE, 3)
        tensors.append(data.permute(2, 0, 1).float() / 255.0)
    pixels = torch.stack(tensors)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def encode_images(encoder: Any, pixels: torch.Tensor, plus: bool) -> torch.Tensor:
    """Embeddings of a CLIPVisionModelWithProjection: penultimate hidden states ``(N, 257, d)``
    for plus adapters, projected ``image_embeds`` ``(N, d)`` for plain ones."""
    parameter = next(encoder.parameters())
    pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
    if plus:
        return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    return encoder(pixel_values=pixels).image_embeds


def cross_attention_layers(unet: Any) -> list[str]:
    """The UNet's spatial cross-attention (attn2) modules in diffusers processor order, which is
    the order of the checkpoint's keys 1, 3, 5, ..."""
    return [
        k.removesuffix(".processor")
        for k in unet.attn_processors
        if k.endswith("attn2.processor") and "temporal_transformer_blocks" not in k
    ]


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """One image prompt: its embedding (one image, or several averaged by the caller), weight,
    active window (fractions of sampling progress) and an optional (H, W) mask in 0..1 with the
    mode that shrinks it to each layer's token grid (``bicubic`` as diffusers and the seed node,
    or ``bilinear`` as ComfyUI_InstantID at HEAD)."""

    embeds: torch.Tensor
    weight: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    mask: torch.Tensor | None = None
    mask_resize: str = "bicubic"
    uncond_embeds: torch.Tensor | None = None  # default: the patch's negative tokens, else zeros
    stop_inclusive: bool = False

    def __post_init__(self) -> None:
        if not -1.0 <= self.weight <= 5.0:
            raise PatchError(f"image prompt weight {self.weight} is outside -1..5")
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise PatchError(f"image prompt window {self.start}..{self.stop}: need 0 <= start <= stop <= 1")
        if self.mask_resize not in MASK_RESIZES:
            raise PatchError(f"mask_resize {self.mask_resize!r}: expected one of {', '.join(MASK_RESIZES)}")
        if self.mask is not None and (self.mask.ndim != 2 or 0 in self.mask.shape):
            raise PatchError(f"an image prompt mask must be (H, W), got {tuple(self.mask.shape)}")


def tensor_digest(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data + str(tuple(tensor.shape)).encode()).hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class IPAdapterPatch(Patch):
    """Image prompts through an IP-Adapter, combined ``additive`` or ``fooocus``."""

    name: ClassVar[str] = "ip_adapter"
    adapter: IPAdapter
    prompts: tuple[ImagePrompt, ...]
    mode: str = "additive"
    layers: tuple[str, ...] = field(default=())  # restrict to these attn2 paths (default: all)
    negative: torch.Tensor | None = None  # uncond tokens (Fooocus' negative file), else projected zeros

    def params(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.digest,
            "mode": self.mode,
            "layers": list(self.layers),
            "negative": tensor_digest(self.negative),
            "prompts": [
                {
                    "embeds": tensor_digest(p.embeds),
                    "uncond": tensor_digest(p.uncond_embeds),
                    "weight": p.weight,
                    "start": p.start,
                    "stop": p.stop,
                    "mask": tensor_digest(p.mask),
                    "mask_resize": p.mask_resize,
                }
                for p in self.prompts
            ],
        }

    def apply(self, ctx: PatchContext) -> None:
        if self.mode not in MODES:
            raise PatchError(f"ip_adapter mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "fooocus" and any(p.mask is not None for p in self.prompts):
            raise PatchError("ip_adapter masks work in additive mode only")
        unet = ctx.unet
        paths = cross_attention_layers(unet)
        if len(paths) != len(self.adapter.layers):
            raise PatchError(
                f"{self.adapter.name or 'the adapter'} has K/V weights for {len(self.adapter.layers)} cross-attention "
                f"layers; this UNet has {len(paths)} (an adapter for another model family?)"
            )
        tokens = []
        for prompt in self.prompts:
            cond = self.adapter.project(prompt.embeds)
            uncond_embeds = prompt.uncond_embeds
            if uncond_embeds is not None:
                uncond = self.adapter.project(uncond_embeds)
            elif self.negative is not None:
                if self.negative.shape[-1] != self.adapter.cross_dim:
                    width = self.negative.shape[-1]
                    raise PatchError(f"negative tokens are {width} wide; the adapter's are {self.adapter.cross_dim}")
                uncond = self.negative.to(cond)
            else:
                uncond = self.adapter.project(torch.zeros_like(prompt.embeds))
            tokens.append((cond.reshape(-1, cond.shape[-1]), uncond.reshape(-1, uncond.shape[-1])))
        plans = [_mask_plan(prompt) for prompt in self.prompts]
        wanted = set(self.layers) or set(paths)
        for path, (k_weight, v_weight) in zip(paths, self.adapter.layers, strict=True):
            if path not in wanted:
                continue
            attn = unet.get_submodule(path)
            if k_weight.shape[0] != attn.to_k.out_features or k_weight.shape[1] != attn.to_k.in_features:
                raise PatchError(
                    f"{path}: the adapter's K projection is {tuple(k_weight.shape)}, the layer needs "
                    f"({attn.to_k.out_features}, {attn.to_k.in_features}) (an adapter for another model family?)"
                )
            branches = [
                _branch(k_weight, v_weight, cond, uncond, prompt, mask, self.mode)
                for prompt, (alive, mask), (cond, uncond) in zip(self.prompts, plans, tokens, strict=True)
                if alive
            ]
            if not branches:
                continue
            ctx.replace_processor(
                f"unet.{path}", lambda previous, b=branches: ImagePromptAttnProcessor(previous, b, ctx.state)
            )


def _mask_plan(prompt: ImagePrompt) -> tuple[bool, torch.Tensor | None]:
    """Whether the prompt gets a branch, and the mask that branch gets. An all-zeros mask adds
    nothing anywhere: no branch (a layer left without branches keeps its processor, so the output
    is the unpatched one, bit for bit). An all-ones mask is no mask (every resize of a constant 1
    is 1): the unmasked branch, bit for bit."""
    mask = prompt.mask
    if mask is None:
        return True, None
    if not bool(mask.any()):
        return False, None
    if bool((mask == 1).all()):
        return True, None
    return True, mask


@torch.no_grad()
def _branch(k_weight, v_weight, cond, uncond, prompt: ImagePrompt, mask, mode: str) -> ImagePromptBranch:
    k_weight = k_weight.to(cond)
    v_weight = v_weight.to(cond)
    mask = mask.to(cond.device) if mask is not None else None
    return ImagePromptBranch(
        cond_keys=cond @ k_weight.T,
        cond_values=cond @ v_weight.T,
        uncond_keys=uncond.to(cond) @ k_weight.T,
        uncond_values=uncond.to(cond) @ v_weight.T,
        weight=prompt.weight,
        start=prompt.start,
        stop=prompt.stop,
        mode=mode,
        mask=mask,
        mask_resize=prompt.mask_resize,
        stop_inclusive=prompt.stop_inclusive,
    )
