"""Tiny stand-ins for the components identity jobs use beside a pipeline, fabricated for tests
and demos (no downloads): IP-Adapter / InstantID checkpoints with a CLIP vision encoder, an
insightface pack (ONNX detector + recognizer), a ControlNet (IdentityNet) and LoRAs. Each fits the
tiny pipelines of :mod:`farm.tiny_models`; heavy imports happen inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from farm.errors import UserError
from farm.tiny_models import CROSS_ATTENTION_DIM, _build_text_pipeline, _quiet_saves, _tiny_vision_encoder, tiny_unet


def build_tiny_ip_adapter(
    family: str,
    out_dir: Path,
    *,
    plus: bool = False,
    seed: int = 0,
    tokens: int = 4,
    embedding_dim: int = 32,
    image_encoder: bool = True,
) -> Path:
    """Fabricate an IP-Adapter for the tiny ``family`` model (``sd15`` or ``sdxl``) in ``out_dir``:
    ``image_encoder/`` (a tiny CLIPVisionModelWithProjection), ``ip-adapter.safetensors`` (flat
    ``image_proj.*`` / ``ip_adapter.*`` keys) and ``ip-adapter.bin`` (the same, nested, as a
    weights-only torch file). ``plus`` makes a Resampler projection over the encoder's hidden
    states; otherwise an ImageProjModel over the projected embedding. An InstantID stand-in is
    ``plus=True, tokens=16, embedding_dim=512, image_encoder=False`` (a Resampler over the
    512-d face embedding, the same file layout as InstantID's ``ip-adapter.bin``). Returns ``out_dir``."""
    if family not in ("sd15", "sdxl"):
        raise UserError(f"family {family!r}: IP-Adapters exist for sd15 and sdxl")
    import torch
    from safetensors.torch import save_file

    from patching.ip_adapter import cross_attention_layers
    from patching.resampler import ImageProjModel, Resampler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image_encoder:
        encoder = _tiny_vision_encoder(seed + 10)
        with _quiet_saves():
            encoder.save_pretrained(out_dir / "image_encoder", safe_serialization=True)
    unet = tiny_unet(family)  # layer widths only
    cross = CROSS_ATTENTION_DIM[family]
    torch.manual_seed(seed + 11)
    if plus:
        projection: Any = Resampler(
            dim=64,
            depth=4,
            dim_head=64,
            heads=1,
            num_queries=tokens,
            embedding_dim=embedding_dim,
            output_dim=cross,
            ff_mult=4,
        )
    else:
        projection = ImageProjModel(cross, embedding_dim, tokens)
    with torch.no_grad():
        for parameter in projection.parameters():  # visible effects, not near-identity
            parameter.add_(torch.randn_like(parameter) * 0.05)
    flat = {f"image_proj.{k}": v.detach().clone().contiguous() for k, v in projection.state_dict().items()}
    for n, path in enumerate(cross_attention_layers(unet)):
        inner = unet.get_submodule(path).to_k.out_features
        index = 2 * n + 1  # diffusers processor order: keys 1, 3, 5, ...
        flat[f"ip_adapter.{index}.to_k_ip.weight"] = torch.randn(inner, cross) * 0.2
        flat[f"ip_adapter.{index}.to_v_ip.weight"] = torch.randn(inner, cross) * 0.2
    save_file(flat, str(out_dir / "ip-adapter.safetensors"))
    nested: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in flat.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = tensor
    torch.save(nested, out_dir / "ip-adapter.bin")
    marker = {"family": family, "plus": plus, "tokens": tokens, "seed": seed, "cross_attention_dim": cross}
    (out_dir / "farm_tiny_ip_adapter.json").write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def build_tiny_face_pack(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny antelopev2-style pack insightface loads without downloads:

    - ``scrfd_10g_bnkps.onnx``: an SCRFD-shaped detector (any input size; 9 outputs: scores,
      boxes, keypoints for strides 8/16/32, two anchors per cell) that reports a face on every
      stride-8 cell whose pixel variance exceeds a threshold, so a flat image has no face and a
      fine texture is found only once the detector size is small enough;
    - ``glintr100.onnx``: an ArcFace-shaped recognizer (112x112 -> 512) that average-pools and
      projects with a fixed random matrix.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inits = [
        numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "column"),
        numpy_helper.from_array(np.array([400.0], dtype=np.float32), "sharpness"),
        numpy_helper.from_array(np.array([0.02], dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([[2.0, 2.0, 2.0, 2.0]], dtype=np.float32), "box"),  # stride units
        numpy_helper.from_array(np.array([[-0.7, -0.5, 0.7, -0.5, 0.0, 0.0, -0.5, 0.7, 0.5, 0.7]], np.float32), "kps"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["gray"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["gray", "gray"], ["gray2"]),
    ]
    for s in (8, 16, 32):
        pool = {"kernel_shape": [s, s], "strides": [s, s]}
        nodes += [
            helper.make_node("AveragePool", ["gray"], [f"mean{s}"], **pool),
            helper.make_node("AveragePool", ["gray2"], [f"meansq{s}"], **pool),
            helper.make_node("Mul", [f"mean{s}", f"mean{s}"], [f"sqmean{s}"]),
            helper.make_node("Sub", [f"meansq{s}", f"sqmean{s}"], [f"var{s}"]),
            helper.make_node("Sub", [f"var{s}", "threshold"], [f"excess{s}"]),
            helper.make_node("Mul", [f"excess{s}", "sharpness"], [f"logit{s}"]),
            helper.make_node("Sigmoid", [f"logit{s}"], [f"prob{s}"]),
            # only stride 8 reports faces
            helper.make_node(
                "Identity" if s == 8 else "Mul", [f"prob{s}"] + ([] if s == 8 else ["zero"]), [f"cell{s}"]
            ),
            helper.make_node("Reshape", [f"cell{s}", "column"], [f"col{s}"]),
            helper.make_node("Concat", [f"col{s}", f"col{s}"], [f"anchors{s}"], axis=1),
            helper.make_node("Reshape", [f"anchors{s}", "column"], [f"score_{s}"]),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"nil{s}"]),
            helper.make_node("Add", [f"nil{s}", "box"], [f"bbox_{s}"]),
            helper.make_node("Add", [f"nil{s}", "kps"], [f"kps_{s}"]),
        ]
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    widths = {"score": 1, "bbox": 4, "kps": 10}
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["anchors", widths[n.split("_")[0]]]) for n in names],
        inits,
    )
    detector = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(detector)
    onnx.save(detector, str(out_dir / "scrfd_10g_bnkps.onnx"))

    rng = np.random.default_rng(seed)
    projection = (rng.standard_normal((3 * 14 * 14, 512)) / 24).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Reshape", ["pooled", "flat"], ["vector"]),
            helper.make_node("MatMul", ["vector", "projection"], ["embedding"]),
        ],
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
        [
            numpy_helper.from_array(projection, "projection"),
            numpy_helper.from_array(np.array([1, 3 * 14 * 14], dtype=np.int64), "flat"),
        ],
    )
    recognizer = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(recognizer)
    onnx.save(recognizer, str(out_dir / "glintr100.onnx"))
    return out_dir


def build_tiny_controlnet(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """A ControlNet for the tiny ``family`` model (an IdentityNet stand-in for ``sdxl``): built
    from the tiny UNet's layout, with a conditioning embedding that downsamples by the tiny VAE's
    factor (2) and random (non-zero) output convolutions so the control has an effect."""
    if family not in ("sd15", "sdxl"):
        raise UserError(f"family {family!r}: tiny ControlNets exist for sd15 and sdxl")
    import diffusers
    import torch

    unet = tiny_unet(family)  # the tiny pipeline's UNet (seed 0): the ControlNet starts as its copy
    torch.manual_seed(seed + 20)
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # zero-initialised convolutions would make the control a no-op
        for name, parameter in controlnet.named_parameters():
            zero_initialised = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")
            if name.startswith(zero_initialised):
                parameter.normal_(0.0, 0.05)
    out_dir = Path(out_dir)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


LORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def build_tiny_lora(
    family: str, out_dir: Path, *, seed: int = 0, rank: int = 4, scale: float = 0.5, text_encoder: bool = True
) -> Path:
    """A LoRA for the tiny ``family`` model in diffusers' layout
    (``out_dir/pytorch_lora_weights.safetensors``, written by the pipeline's ``save_lora_weights``):
    rank ``rank`` on every attention projection of the UNet and, with ``text_encoder``, of the
    text encoder(s). Its up (B) matrices are random with standard deviation ``scale``, not zero
    as a fresh LoRA's, so it changes the output. Returns the file."""
    if family not in ("sd15", "sdxl"):
        raise UserError(f"family {family!r}: tiny LoRAs exist for sd15 and sdxl")
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = _build_text_pipeline(family, 0)  # layer names and widths are all a LoRA needs
    generator = torch.Generator().manual_seed(seed + 30)
    parts = {"unet": LORA_UNET_TARGETS}
    if text_encoder:
        parts.update({name: LORA_TEXT_TARGETS for name in ("text_encoder", "text_encoder_2") if hasattr(pipe, name)})
    layers = {}
    for name, targets in parts.items():
        module = getattr(pipe, name)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian")
        inject_adapter_in_model(config, module, adapter_name="default")
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters():
                if ".lora_B." in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    out_dir = Path(out_dir)
    type(pipe).save_lora_weights(out_dir, **layers)
    return out_dir / "pytorch_lora_weights.safetensors"
