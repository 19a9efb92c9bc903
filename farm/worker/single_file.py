"""Single-file checkpoints (A1111/ComfyUI ``.safetensors``) turned into diffusers folders, offline.

:func:`convert_single_file` loads the checkpoint with diffusers' single-file loader
(``from_single_file``), with every config taken from a local diffusers folder of the same family
(its ``model_index.json``, component configs, tokenizer and scheduler; its weights are not used)
and ``local_files_only``: no hub call is ever made. The pipeline is written with
``save_pretrained`` (safetensors) into a folder that :func:`farm.model_registry.push_model` pushes.
Only ``.safetensors`` files are read (never a pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from safetensors import safe_open

from farm.errors import UserError
from farm.model_registry import PIPELINE_CLASSES

IMPORT_FAMILIES = ("sd15", "sdxl")


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype of the checkpoint's UNet weights (what the converted folder keeps)."""
    with safe_open(str(path), framework="pt") as handle:
        keys = [k for k in handle.keys() if k.startswith("model.diffusion_model.")]  # noqa: SIM118 (not a dict)
        if not keys:
            raise UserError(f"{path}: no model.diffusion_model.* weights; not an SD1.5/SDXL single-file checkpoint")
        return handle.get_tensor(keys[0]).dtype


def convert_single_file(checkpoint: Path, family: str, config: Path, out: Path) -> Path:
    """Write the diffusers pipeline of ``checkpoint`` (a ``family`` single-file checkpoint) to
    ``out``, configs from the diffusers folder ``config``; returns ``out``."""
    if family not in IMPORT_FAMILIES:
        raise UserError(f"family: {family!r}: single-file import supports {' and '.join(IMPORT_FAMILIES)}")
    if checkpoint.suffix != ".safetensors" or not checkpoint.is_file():
        raise UserError(f"{checkpoint}: give a .safetensors single-file checkpoint (pickled .ckpt files are not read)")
    index = config / "model_index.json"
    try:
        declared = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"--config {config}: no readable model_index.json (a diffusers folder of the family)") from None
    if declared != PIPELINE_CLASSES[family]:
        raise UserError(f"--config {config} is a {declared}, not a {PIPELINE_CLASSES[family]} (family {family})")
    cls = getattr(diffusers, PIPELINE_CLASSES[family])
    try:
        pipeline = cls.from_single_file(
            str(checkpoint), config=str(config), local_files_only=True, torch_dtype=checkpoint_dtype(checkpoint)
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{checkpoint}: not a {family} single-file checkpoint ({reason})") from None
    pipeline.save_pretrained(str(out), safe_serialization=True)
    return out
