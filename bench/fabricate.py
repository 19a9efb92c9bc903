"""Random-weight models and adapters for the benchmarks (no downloads, safetensors only).

- :func:`real_unet`: a UNet at the real SD1.5 / SDXL / SVD size (:data:`farm.model_configs.REAL_UNETS`),
  built directly on the target device (fast random init on a GPU).
- :func:`around_real_unet`: a tiny pipeline of :mod:`farm.tiny_models` with its UNet replaced by a
  real-size one (tiny VAE; text encoders dropped, the benches feed random prompt embeddings of the
  real width; SVD gets a tiny CLIP vision encoder projecting to the real context width).
- :func:`write_adapter`: an IP-Adapter (plain or plus) or an InstantID checkpoint for a UNet, as
  ``ip-adapter.safetensors`` in the IP-Adapter layout (flat ``image_proj.*`` / ``ip_adapter.<n>.*``
  keys, n = 1, 3, 5, ... in diffusers processor order). Tiny sizes go through
  :func:`farm.tiny_components.build_tiny_ip_adapter`; real sizes use the published shapes
  (ImageProjModel over a 1024/1280-d CLIP embedding, 4 tokens; Resampler plus adapters over
  257x1280 CLIP hidden states, 16 tokens; InstantID's Resampler over a 512-d face embedding).
- :func:`embeddings`: random inputs of the shape each adapter kind takes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from farm.model_configs import REAL_UNETS
from farm.tiny_models import _tiny_vision_encoder

ADAPTER_KINDS = ("ip_adapter", "ip_adapter_plus", "instantid")
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "svd": "StableVideoDiffusionPipeline",
}
# Real checkpoints' image projections: (embedding width, resampler dim, heads) per family.
_REAL_PLAIN_EMBEDDING = {"sd15": 1024, "sdxl": 1280}  # ip-adapter_sd15 (ViT-H), ip-adapter_sdxl (ViT-bigG)
_REAL_PLUS = {"sd15": (768, 12), "sdxl": (1280, 20)}  # ip-adapter-plus_sd15 / plus_sdxl_vit-h
_REAL_CLIP_HIDDEN = (257, 1280)  # ViT-H/14 penultimate hidden states
_TINY_CLIP_HIDDEN = (50, 32)  # farm.tiny_models' vision encoder: 7x7 patches + class token, width 32


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def real_unet(family: str, device: str = "cpu", dtype: Any = None, seed: int = 0) -> Any:
    """A random-weight UNet at the real size of ``family`` on ``device``."""
    import diffusers
    import torch

    cls_name, config = REAL_UNETS[family]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = getattr(diffusers, cls_name)(**config)
    return unet.to(dtype=dtype) if dtype is not None else unet


def around_real_unet(pipe: Any, family: str, unet: Any, *, keep_text_encoders: bool = False) -> Any:
    """``pipe`` (a tiny pipeline of ``family``) rebuilt around the real-size ``unet``."""
    components = {**pipe.components, "unet": unet}
    if family == "svd":
        components["image_encoder"] = _tiny_vision_encoder(0, unet.config.cross_attention_dim)
    elif not keep_text_encoders:  # tiny encoders make 32/64-wide context; the benches pass real-width embeddings
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if name in components:
                components[name] = None
    return type(pipe)(**components)


def load_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Any:
    """Write the tiny ``family`` pipeline under ``folder`` (unless there) and load it."""
    import diffusers

    from farm.tiny_models import build_tiny_model

    if not (folder / "model_index.json").is_file():
        build_tiny_model(family, folder, seed=seed)
    kwargs = {"safety_checker": None} if family == "sd15" else {}
    return getattr(diffusers, PIPELINES[family]).from_pretrained(folder, **kwargs)


def write_real_pipeline(family: str, folder: Path, dtype: Any, device: str = "cpu", seed: int = 0) -> Path:
    """A loadable pipeline folder with a real-size UNet (``dtype``) and the tiny other components."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"bench-tiny-{family}-") as tmp:
        pipe = load_tiny_pipeline(family, Path(tmp) / family, seed=seed)
    pipe = around_real_unet(pipe, family, real_unet(family, device, dtype, seed), keep_text_encoders=True)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    if family == "svd":  # as farm.tiny_models writes it: the portable processor name
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        if (index.get("feature_extractor") or [None])[0] == "transformers":
            index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    del pipe
    return folder


def link_copy(source: Path, target: Path) -> Path:
    """``target`` as a second model folder whose files are symlinks to ``source``'s (the same bytes
    on disk, loaded as a different model)."""
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), dest)
    return target


# -- adapters ---------------------------------------------------------------------------------------
def write_adapter(unet: Any, family: str, kind: str, size: str, folder: Path, seed: int = 0) -> Path:
    """An adapter checkpoint of ``kind`` for ``unet`` in ``folder``; returns the safetensors file."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind {kind!r}: expected one of {', '.join(ADAPTER_KINDS)}")
    if size == "tiny":
        from farm.tiny_components import build_tiny_ip_adapter

        options: dict[str, Any] = {"plus": kind != "ip_adapter", "image_encoder": False, "seed": seed}
        if kind == "instantid":
            options.update(tokens=16, embedding_dim=512)
        build_tiny_ip_adapter(family, folder, **options)
        return folder / "ip-adapter.safetensors"
    import torch
    from safetensors.torch import save_file

    from patching.ip_adapter import cross_attention_layers
    from patching.resampler import ImageProjModel, Resampler

    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed + 11)
    if kind == "ip_adapter":
        projection: Any = ImageProjModel(cross, _REAL_PLAIN_EMBEDDING[family], 4)
    elif kind == "ip_adapter_plus":
        dim, heads = _REAL_PLUS[family]
        projection = Resampler(dim, 4, 64, heads, 16, _REAL_CLIP_HIDDEN[1], cross, 4)
    else:  # InstantID: Resampler(1280, 4, 64, 20, 16, 512) to the context width
        projection = Resampler(1280, 4, 64, 20, 16, 512, cross, 4)
    flat = {f"image_proj.{k}": v.detach().to(torch.float16).contiguous() for k, v in projection.state_dict().items()}
    for n, path in enumerate(cross_attention_layers(unet)):
        inner = unet.get_submodule(path).to_k.out_features
        for name in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(inner, cross) / cross**0.5
            flat[f"ip_adapter.{2 * n + 1}.{name}.weight"] = weight.to(torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(folder / "ip-adapter.safetensors"))  # fp16, as the published checkpoints
    return folder / "ip-adapter.safetensors"


def embeddings(kind: str, family: str, size: str, seed: int = 0) -> Any:
    """Random inputs for an adapter of ``kind``: a CLIP image embedding ``(1, D)`` (plain), CLIP
    hidden states ``(1, T, D)`` (plus) or raw face embeddings ``(2, 512)`` at ArcFace scale."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if kind == "instantid":
        return torch.randn(2, 512, generator=generator) * 20
    if kind == "ip_adapter":
        width = _REAL_PLAIN_EMBEDDING[family] if size == "real" else _TINY_CLIP_HIDDEN[1]
        return torch.randn(1, width, generator=generator)
    tokens, width = _REAL_CLIP_HIDDEN if size == "real" else _TINY_CLIP_HIDDEN
    return torch.randn(1, tokens, width, generator=generator)


def safetensors_numel(folder: Path) -> int:
    """Parameters stored in the safetensors files under ``folder`` (headers only, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                numel = 1
                for dim in handle.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total
