"""Loading the auxiliary models a worker pins beside its pipelines: IP-Adapter and InstantID
checkpoints, CLIP vision encoders, ControlNets and face-analysis packs. Used as the loader of a
:class:`~farm.worker.model_cache.ModelCache` (``family`` names the kind of component), so each is
loaded once per worker process and then reused across jobs; a job switch only swaps the attention
patches built from them. A file that cannot be loaded is a :class:`ModelLoadError` naming the
spec field that points at it. :func:`component_bytes` is what each one counts against the
``worker.component_cache_mb`` budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farm.worker.devices import Placement
from farm.worker.model_cache import ModelLoadError, missing_path_message, model_fingerprint

KINDS = ("ip_adapter", "instantid", "clip_vision", "ip_negative", "controlnet", "face_analysis/<auto|cpu|cuda>")
# IP-Adapter-layout checkpoints by kind, and the spec field that names them (for error messages).
CHECKPOINT_FIELDS = {"ip_adapter": "identity.adapter", "instantid": "identity.checkpoint"}
# Every spec-named component: (spec field, "file" or "folder"), for a path missing on this host.
SPEC_PATHS = {
    **{kind: (label, "file") for kind, label in CHECKPOINT_FIELDS.items()},
    "ip_negative": ("identity.negative", "file"),
    "clip_vision": ("identity.image_encoder", "folder"),
    "controlnet": ("identity.controlnet", "folder"),
}


def component_bytes(component: Any) -> int:
    """The memory a loaded component holds: its tensors (parameters and buffers of a module, an
    IP-Adapter's projection and K/V weights, a tensor of negative tokens) or, for a face-analysis
    pack whose weights live in ONNX Runtime, its ``.onnx`` files' sizes."""
    if hasattr(component, "numel") and hasattr(component, "element_size"):  # a tensor
        return int(component.numel() * component.element_size())
    if callable(getattr(component, "parameters", None)):  # a torch module (encoder, ControlNet)
        tensors = [*component.parameters(), *component.buffers()]
        return sum(int(t.numel() * t.element_size()) for t in tensors)
    if hasattr(component, "projection") and hasattr(component, "layers"):  # patching.ip_adapter.IPAdapter
        layers = sum(component_bytes(k) + component_bytes(v) for k, v in component.layers)
        return component_bytes(component.projection) + layers
    folder = getattr(component, "folder", None)  # patching.face_analysis.FaceAnalyzer
    if isinstance(folder, Path):
        return sum(f.stat().st_size for f in folder.glob("*.onnx"))
    return 0


def _from_folder(cls: Any, path: str, label: str, what: str, placement: Placement) -> tuple[Any, str]:
    """A ``from_pretrained`` folder of ``cls`` on the placement's device, in eval mode."""
    location = Path(path).expanduser()
    if not (location / "config.json").is_file():
        raise ModelLoadError(f"{label}: {path} is not a {what} folder (no config.json)")
    try:
        module = cls.from_pretrained(location, dtype=placement.dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{label}: {path} could not be loaded: {str(exc)[:300]}") from None
    return module.to(placement.device).eval(), model_fingerprint(location)


def load_component(path: str, kind: str, placement: Placement) -> tuple[Any, str]:
    """``(component, hash)`` for ``kind`` at ``path``, on the placement's device and dtype."""
    from patching import PatchError

    location = Path(path).expanduser()
    if kind in SPEC_PATHS and not location.exists():  # resolved on this worker's host, not the submitter's
        label, what = SPEC_PATHS[kind]
        raise ModelLoadError(missing_path_message(label, path, what))
    if kind in CHECKPOINT_FIELDS:
        from patching.ip_adapter import load_ip_adapter

        try:
            adapter = load_ip_adapter(location)
        except PatchError as exc:
            raise ModelLoadError(f"{CHECKPOINT_FIELDS[kind]}: {exc}") from None
        return adapter.to(placement.device, placement.dtype), model_fingerprint(location)
    if kind == "ip_negative":
        from patching.ip_adapter import load_negative

        try:
            tokens = load_negative(location)
        except PatchError as exc:
            raise ModelLoadError(f"identity.negative: {exc}") from None
        return tokens.to(device=placement.device, dtype=placement.dtype), model_fingerprint(location)
    if kind == "clip_vision":
        from transformers import CLIPVisionModelWithProjection

        return _from_folder(
            CLIPVisionModelWithProjection, path, "identity.image_encoder", "CLIP vision model", placement
        )
    if kind == "controlnet":
        import diffusers

        return _from_folder(diffusers.ControlNetModel, path, "identity.controlnet", "ControlNet", placement)
    if kind.startswith("face_analysis/"):
        from patching.face_analysis import FaceAnalyzer

        try:
            analyzer = FaceAnalyzer(location, providers=kind.partition("/")[2])
        except PatchError as exc:
            raise ModelLoadError(f"face analysis: {exc}") from None
        return analyzer, model_fingerprint(location)
    raise ModelLoadError(f"unknown component kind {kind!r}; known: {', '.join(KINDS)}")
