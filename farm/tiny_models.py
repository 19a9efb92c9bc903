"""Tiny random-weight diffusers models, built from configs (no downloads), for tests and the demo.

``build_tiny_model(family, folder)`` writes a complete pipeline folder (safetensors weights) that
``from_pretrained`` loads like a real checkpoint. Same seed -> identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from farm.errors import UserError

FAMILIES = ("sd15", "sdxl")


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0-255 (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tokenizer(folder: Path) -> Any:
    """A byte-level CLIP tokenizer with a tiny vocabulary (real words split into characters)."""
    from transformers import CLIPTokenizer

    chars = _byte_characters()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "a n", "o n</w>", "i n"]
    for merge in merges:
        left, right = merge.split()
        merged = left + right
        if merged not in vocab_list:
            vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77, pad_token="<|endoftext|>")  # noqa: S106


def _text_encoder(vocab_size: int, hidden: int, projection: bool = False, projection_dim: int = 32) -> Any:
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


def build_tiny_model(family: str, folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight pipeline of ``family`` into ``folder``; returns the folder."""
    if family not in FAMILIES:
        raise UserError(f"family {family!r}: tiny models exist for {', '.join(FAMILIES)}")
    import diffusers
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(folder)
    vocab_size = len(tokenizer)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    torch.manual_seed(seed)
    if family == "sd15":
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = _vae()
        torch.manual_seed(seed + 2)
        text_encoder = _text_encoder(vocab_size, 32)
        pipe = diffusers.StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    else:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = _vae()
        torch.manual_seed(seed + 2)
        text_encoder = _text_encoder(vocab_size, 32)
        torch.manual_seed(seed + 3)
        text_encoder_2 = _text_encoder(vocab_size, 32, projection=True, projection_dim=32)
        pipe = diffusers.StableDiffusionXLPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    marker = {
        "family": family,
        "seed": seed,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    (folder / "farm_tiny.json").write_text(json.dumps(marker, indent=2))
    return folder
