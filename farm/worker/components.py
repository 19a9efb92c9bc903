"""Loading the auxiliary models a worker pins beside its pipelines: IP-Adapter checkpoints and
CLIP vision encoders. Used as the loader of a :class:`~farm.worker.model_cache.ModelCache`
(``family`` names the kind of component), so each is loaded once per worker process and then
reused across jobs; a job switch only swaps the attention patches built from them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from farm.worker.devices import Placement
from farm.worker.model_cache import ModelLoadError, model_fingerprint

KINDS = ("ip_adapter", "clip_vision", "ip_negative", "controlnet", "face_analysis/<auto|cpu|cuda>")


def load_component(path: str, kind: str, placement: Placement) -> tuple[Any, str]:
    """``(component, hash)`` for ``kind`` at ``path``, on the placement's device and dtype."""
    from patching import PatchError

    location = Path(path).expanduser()
    if kind == "ip_adapter":
        from patching.ip_adapter import load_ip_adapter

        try:
            adapter = load_ip_adapter(location)
        except PatchError as exc:
            raise ModelLoadError(f"identity.adapter: {exc}") from None
        digest = hashlib.sha256(location.read_bytes()).hexdigest()
        return adapter.to(placement.device, placement.dtype), digest
    if kind == "ip_negative":
        from patching.ip_adapter import load_negative

        try:
            tokens = load_negative(location)
        except PatchError as exc:
            raise ModelLoadError(f"identity.negative: {exc}") from None
        return tokens.to(device=placement.device, dtype=placement.dtype), hashlib.sha256(
            location.read_bytes()
        ).hexdigest()
    if kind == "clip_vision":
        from transformers import CLIPVisionModelWithProjection

        if not (location / "config.json").is_file():
            raise ModelLoadError(f"identity.image_encoder: {path} is not a CLIP vision model folder (no config.json)")
        try:
            encoder = CLIPVisionModelWithProjection.from_pretrained(location, dtype=placement.dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"identity.image_encoder: {path} could not be loaded: {str(exc)[:300]}") from None
        return encoder.to(placement.device).eval(), model_fingerprint(location)
    if kind == "controlnet":
        import diffusers

        if not (location / "config.json").is_file():
            raise ModelLoadError(f"identity.controlnet: {path} is not a ControlNet folder (no config.json)")
        try:
            controlnet = diffusers.ControlNetModel.from_pretrained(location, dtype=placement.dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"identity.controlnet: {path} could not be loaded: {str(exc)[:300]}") from None
        return controlnet.to(placement.device).eval(), model_fingerprint(location)
    if kind.startswith("face_analysis/"):
        from patching.face_analysis import FaceAnalyzer

        try:
            analyzer = FaceAnalyzer(location, providers=kind.partition("/")[2])
        except PatchError as exc:
            raise ModelLoadError(f"face analysis: {exc}") from None
        return analyzer, model_fingerprint(location)
    raise ModelLoadError(f"unknown component kind {kind!r}; known: {', '.join(KINDS)}")
