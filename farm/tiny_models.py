"""Tiny random-weight diffusers models, built from configs (no downloads), for tests and the demo.

``build_tiny_model(family, out_dir)`` writes a complete pipeline folder (safetensors weights, the
tokenizer or image processor, the scheduler) that ``from_pretrained`` loads like a real
checkpoint. Same seed -> bit-identical weights. torch, diffusers and transformers are imported
inside the functions, so importing this module stays cheap.

What patch code can rely on (the layouts these configs produce):

- ``sd15``: ``StableDiffusionPipeline``. UNet blocks (32, 64), ``CrossAttnDownBlock2D`` +
  ``DownBlock2D``; cross-attention width 32 (one CLIP text encoder, hidden size 32); one
  transformer block per attention (``down_blocks.0``, ``mid_block``, ``up_blocks.1``).
- ``sdxl``: ``StableDiffusionXLPipeline``. UNet blocks (32, 64), ``DownBlock2D`` +
  ``CrossAttnDownBlock2D``, ``transformer_layers_per_block=(1, 2)``: every attention has two
  transformer blocks (``...attentions.N.transformer_blocks.{0,1}``); cross-attention width 64
  (32 + 32 from the two text encoders); ``text_time`` embedding with 6 time ids of width 8 plus
  the 32-wide pooled projection (80 in all).
- ``svd``: ``StableVideoDiffusionPipeline``. Spatio-temporal UNet blocks (32, 64),
  cross-attention width 32 (the CLIP vision projection); spatial blocks under
  ``.transformer_blocks.N``, temporal ones under ``temporal_transformer_blocks.N``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from farm.errors import UserError

FAMILIES = ("sd15", "sdxl", "svd")

# Widths later code (patches, adapters) must match: the cross-attention context width per family.
CROSS_ATTENTION_DIM = {"sd15": 32, "sdxl": 64, "svd": 32}

# Byte-pair merges of the tiny tokenizer; each side must already be a token.
_MERGES = ("t h", "th e</w>", "a n", "o n</w>", "i n", "a t</w>", "c at</w>", "o f</w>")

# The scheduler of stabilityai/stable-video-diffusion-img2vid(-xt), without the keys Euler ignores.
_SVD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}


def check_family(family: str) -> str:
    """``family`` if tiny models exist for it; a :class:`UserError` naming the known ones if not."""
    if family not in FAMILIES:
        raise UserError(f"family {family!r}: tiny models exist for {', '.join(FAMILIES)}")
    return family


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0-255 (GPT-2's table)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny CLIP vocabulary (bytes, bytes + ``</w>``, merged tokens, the two specials) and
    its merges; ``<|startoftext|>`` and ``<|endoftext|>`` are the last two ids."""
    chars = _byte_characters()
    tokens = chars + [c + "</w>" for c in chars]
    merges = [tuple(m.split()) for m in _MERGES]
    for left, right in merges:
        if left not in tokens or right not in tokens:
            raise RuntimeError(f"merge {left} {right}: both sides must be tokens")  # a bug in _MERGES
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _tokenizer() -> Any:
    """A byte-level CLIP tokenizer with a tiny vocabulary (real words split into pieces).

    transformers 5 ignores ``vocab_file=``/``merges_file=`` (every word becomes
    ``<|endoftext|>``), so the vocabulary and merges are passed in memory. Its ``save_pretrained``
    writes only ``tokenizer.json``; :func:`_finish_folder` adds ``vocab.json``/``merges.txt``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        pad_token="<|endoftext|>",  # noqa: S106 - a token, not a password
    )
    ids = tokenizer("a photo of a cat").input_ids
    if len(set(ids)) < 4:  # start, end and at least two word pieces
        raise RuntimeError(f"tiny tokenizer is broken: 'a photo of a cat' -> {ids}")
    return tokenizer


def _text_encoder(vocab_size: int, hidden: int, *, projection: bool = False, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _text_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )


# The tiny UNet of each family: the class and its config (the layouts the module docstring
# describes). Every family shares its channel widths and depth; the text-to-image families also
# share their 4-channel latents and 8-group norms.
_UNET_SHARED = {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 8, "out_channels": 4}
_TEXT_UNET_SHARED = {**_UNET_SHARED, "in_channels": 4, "norm_num_groups": 8}
_UNETS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd15": (
        "UNet2DConditionModel",
        {
            **_TEXT_UNET_SHARED,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 8,
        },
    ),
    "sdxl": (
        "UNet2DConditionModel",
        {
            **_TEXT_UNET_SHARED,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,  # 6 time ids * 8 + 32 pooled text
        },
    ),
    # Its GroupNorms use 32 groups (not configurable): every channel count is a multiple of 32.
    "svd": (
        "UNetSpatioTemporalConditionModel",
        {
            **_UNET_SHARED,
            "in_channels": 8,  # noisy latents + the conditioning image's latents
            "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 24,  # fps, motion bucket, noise augmentation: 3 * 8
            "num_attention_heads": (2, 4),
            "num_frames": 14,
        },
    ),
}
# How many CLIP text encoders (and tokenizers) each text-to-image pipeline has.
_TEXT_ENCODERS = {"sd15": 1, "sdxl": 2}


def tiny_unet(family: str, seed: int = 0) -> Any:
    """The tiny UNet of ``family``, with the weights it has in the tiny pipeline built with
    ``seed`` (adapters and ControlNets are built against its layer widths)."""
    import diffusers
    import torch

    cls, config = _UNETS[check_family(family)]
    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**config, cross_attention_dim=CROSS_ATTENTION_DIM[family])


def _build_text_pipeline(family: str, seed: int) -> Any:
    """The tiny ``sd15`` or ``sdxl`` pipeline: the UNet (``seed``), the VAE (``seed + 1``) and its
    text encoders (``seed + 2`` on; SDXL's second one has the pooled projection); one tokenizer
    serves both encoders."""
    import diffusers
    import torch

    tokenizer = _tokenizer()
    unet = tiny_unet(family, seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    parts: dict[str, Any] = {"unet": unet, "vae": vae, "scheduler": _text_scheduler()}
    for n in range(_TEXT_ENCODERS[family]):
        suffix = f"_{n + 1}" if n else ""
        torch.manual_seed(seed + 2 + n)
        parts[f"text_encoder{suffix}"] = _text_encoder(len(tokenizer), 32, projection=n == 1, projection_dim=32)
        parts[f"tokenizer{suffix}"] = tokenizer
    if family == "sd15":
        return diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False
        )
    return diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)


def _build_svd(seed: int) -> Any:
    import diffusers
    import torch
    import transformers

    unet = tiny_unet("svd", seed)
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    # The pipeline resizes the conditioning image to 224x224 whatever the config says.
    image_encoder = _tiny_vision_encoder(seed + 2)  # projection width 32 = the UNet's context width
    # transformers 5 without torchvision substitutes the PIL processor anyway (with a warning); the
    # saved preprocessor_config.json is the same either way.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    feature_extractor = processor_cls(crop_size=224, size={"shortest_edge": 224})
    scheduler = diffusers.EulerDiscreteScheduler(**_SVD_SCHEDULER)
    return diffusers.StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )


def _finish_folder(out_dir: Path, family: str) -> None:
    """Make the saved folder look like a real checkpoint, whatever this host's transformers is.

    - transformers 5 saves only ``tokenizer.json``; the classic ``vocab.json``/``merges.txt``
      are written next to it (older transformers and other tools read those).
    - Without torchvision, transformers 5 substitutes ``CLIPImageProcessorPil`` and diffusers
      records that name; ``model_index.json`` gets the portable ``CLIPImageProcessor`` back.
    """
    vocab, merges = tiny_vocab()
    for name in ("tokenizer", "tokenizer_2"):
        folder = out_dir / name
        if folder.is_dir():
            (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
            (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if family == "svd":
        index_path = out_dir / "model_index.json"
        index = json.loads(index_path.read_text())
        library, cls = index.get("feature_extractor") or (None, None)
        if library == "transformers" and cls != "CLIPImageProcessor":
            index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _quiet_saves() -> Iterator[None]:
    """transformers 5 shows a progress bar per saved model; not in our output."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def build_tiny_model(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight pipeline of ``family`` (``sd15``, ``sdxl`` or ``svd``) into
    ``out_dir`` and a ``farm_tiny.json`` marker next to ``model_index.json``; returns the folder."""
    check_family(family)
    import diffusers
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = _build_svd(seed) if family == "svd" else _build_text_pipeline(family, seed)
    with _quiet_saves():
        pipe.save_pretrained(out_dir, safe_serialization=True)
    _finish_folder(out_dir, family)
    marker = {
        "family": family,
        "seed": seed,
        "pipeline": type(pipe).__name__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out_dir / "farm_tiny.json").write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def _tiny_vision_encoder(seed: int, projection_dim: int = 32) -> Any:
    """A tiny CLIP vision encoder; ``projection_dim`` is the width of its image embeddings."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
            projection_dim=projection_dim,
        )
    )
