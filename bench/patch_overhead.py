"""Patch runtime overhead: step time with each patch applied vs unpatched, and our IP-Adapter vs
diffusers' native one.

One pipeline per family, the same inputs (random prompt embeddings of the UNet's context width, the
same seed), timed in one process with the variants interleaved (each repeat runs every variant
once; medians). A variant is set up before its run and untimed: ``ModelPatcher.ensure`` of its
patch set (``[]`` for ``unpatched``), or diffusers' IP-Adapter processors switched in. Timed: the
pipeline call (``output_type="latent"``, no VAE decode) divided by the steps, so seconds per step
is the UNet's time (with classifier-free guidance, a batch of 2) plus the scheduler's.

Variants (sd15, sdxl): ``unpatched``, the self and cross attention multipliers (weight patches:
their only runtime cost is the patcher's UNet pre-hook), ``ip_adapter`` / ``ip_adapter_plus``
(ours, :class:`patching.ip_adapter.IPAdapterPatch`, additive) and ``ip_adapter_native`` /
``ip_adapter_plus_native`` (diffusers' ``pipeline.load_ip_adapter`` of the same safetensors file,
``IPAdapterAttnProcessor2_0`` with the same scale, the image embeddings passed as
``ip_adapter_image_embeds``), ``instantid`` (ours) and ``sag`` (ours: one extra UNet pass of the
uncond half per step). svd: ``unpatched``, the temporal and self attention multipliers.

For each native pair: ours / native step time (target: ours no slower; ours projects the image
tokens and their K/V once per job, diffusers per UNet call) and the largest difference between the
two final latents, next to how far the adapter moves them from the unpatched ones.

    python -m bench.patch_overhead                               # tiny sd15, sdxl, svd on CPU
    python -m bench.patch_overhead --size real --family sd15 --latent 32 --steps 2 --repeats 2
    python -m bench.patch_overhead --size real --device cuda --dtype float16 --family sdxl --latent 128

``--size real`` puts a random-weight UNet of the real size into the tiny pipeline (the tiny VAE
stays; text encoders are not used) and writes adapters at the published shapes. ``--json FILE``
writes the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cli import add_model_options, add_output_options, per_family, prepare_libraries

FAMILIES = ("sd15", "sdxl", "svd")
VARIANTS = {
    "sd15": (
        "unpatched",
        "self_attention_multiply",
        "cross_attention_multiply",
        "ip_adapter",
        "ip_adapter_native",
        "ip_adapter_plus",
        "ip_adapter_plus_native",
        "instantid",
        "sag",
    ),
    "svd": ("unpatched", "temporal_attention_multiply", "self_attention_multiply"),
}
VARIANTS["sdxl"] = VARIANTS["sd15"]
ALL_VARIANTS = tuple(dict.fromkeys(v for family in FAMILIES for v in VARIANTS[family]))
NATIVE_PAIRS = {"ip_adapter": "ip_adapter_native", "ip_adapter_plus": "ip_adapter_plus_native"}
IP_SCALE = 0.7


class NativeIPAdapter:
    """diffusers' own IP-Adapter on ``pipe`` (``load_ip_adapter`` of ``path``, scale ``IP_SCALE``),
    switched on and off without reloading: off restores what ``unload_ip_adapter`` restores (the
    UNet's processors, ``encoder_hid_proj`` and ``encoder_hid_dim_type``)."""

    def __init__(self, pipe: Any, path: Path) -> None:
        unet = pipe.unet
        self.pipe, self.unet = pipe, unet
        self.base = dict(unet.attn_processors)
        pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
        pipe.set_ip_adapter_scale(IP_SCALE)
        self.processors = dict(unet.attn_processors)
        self.projection = unet.encoder_hid_proj
        self.off()

    # The projection goes in first and out first: a plus adapter's Resampler has attention layers of
    # its own, which set_attn_processor counts.
    def on(self) -> None:
        self.unet.encoder_hid_proj = self.projection
        self.unet.config.encoder_hid_dim_type = "ip_image_proj"
        self.unet.set_attn_processor(dict(self.processors))

    def off(self) -> None:
        self.unet.encoder_hid_proj = None
        self.unet.config.encoder_hid_dim_type = None
        self.unet.set_attn_processor(dict(self.base))


def _pipeline(family: str, size: str, folder: Path, device: str, dtype: Any) -> Any:
    from bench.fabricate import around_real_unet, load_tiny_pipeline, real_unet

    pipe = load_tiny_pipeline(family, folder)
    if size == "real":
        pipe = around_real_unet(pipe, family, real_unet(family, device, dtype))
    pipe = pipe.to(device=device, dtype=dtype)  # the tiny models' own Euler schedulers
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_args(pipe: Any, family: str, latent: int, steps: int, frames: int, device: str, dtype: Any) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    pixels = latent * pipe.vae_scale_factor
    args: dict[str, Any] = {"num_inference_steps": steps, "width": pixels, "height": pixels, "output_type": "latent"}
    if family == "svd":
        from PIL import Image

        data = (torch.rand(pixels, pixels, 3, generator=generator) * 255).to(torch.uint8).numpy()
        args.update(
            image=Image.fromarray(data),
            num_frames=frames,
            decode_chunk_size=frames,
            min_guidance_scale=1.0,
            max_guidance_scale=3.0,
        )
        return args
    width = pipe.unet.config.cross_attention_dim
    embeds = torch.randn(2, 77, width, generator=generator).to(device, dtype)
    args.update(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], guidance_scale=7.5)
    if family == "sdxl":
        config = pipe.unet.config
        pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = torch.randn(2, pooled_width, generator=generator).to(device, dtype)
        args.update(pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=pooled[:1])
    return args


def _variants(
    family: str, size: str, pipe: Any, patcher: Any, folder: Path, wanted: tuple[str, ...], device: str, dtype: Any
) -> dict[str, tuple[Callable[[], None], dict[str, Any]]]:
    """``name -> (setup, extra call args)`` for the variants of ``family`` in ``wanted``."""
    import torch

    import patching
    from bench.fabricate import embeddings, write_adapter
    from patching.instantid import InstantIDPatch
    from patching.ip_adapter import ImagePrompt, IPAdapterPatch, load_ip_adapter
    from patching.sag import SelfAttentionGuidance

    names = [v for v in VARIANTS[family] if v in wanted]
    natives: dict[str, NativeIPAdapter] = {}
    out: dict[str, tuple[Callable[[], None], dict[str, Any]]] = {}

    def ours(patches: list[Any]) -> Callable[[], None]:
        def setup() -> None:
            for native in natives.values():
                native.off()
            patcher.ensure(patches)

        return setup

    multipliers = {
        "self_attention_multiply": patching.UNetSelfAttentionMultiply(q=1.1, k=0.9, v=1.2, out=0.8),
        "cross_attention_multiply": patching.UNetCrossAttentionMultiply(q=1.1, k=0.9, v=1.2, out=0.8),
        "temporal_attention_multiply": patching.UNetTemporalAttentionMultiply(
            self_structural=1.1, self_temporal=1.3, cross_structural=0.9, cross_temporal=0.7
        ),
    }
    for name in names:
        if name == "unpatched":
            out[name] = (ours([]), {})
        elif name in multipliers:
            out[name] = (ours([multipliers[name]]), {})
        elif name == "sag":
            out[name] = (ours([SelfAttentionGuidance(scale=0.75, blur_sigma=1.0)]), {})
        elif name == "instantid":
            path = write_adapter(pipe.unet, family, "instantid", size, folder / "instantid")
            adapter = load_ip_adapter(path).to(device, dtype)
            faces = embeddings("instantid", family, size).to(device, dtype)
            out[name] = (ours([InstantIDPatch(adapter, faces, weight=0.8)]), {})
    for kind, native_name in NATIVE_PAIRS.items():
        if kind not in names and native_name not in names:
            continue
        path = write_adapter(pipe.unet, family, kind, size, folder / kind)
        embeds = embeddings(kind, family, size).to(device, dtype)
        if kind in names:
            adapter = load_ip_adapter(path).to(device, dtype)
            out[kind] = (ours([IPAdapterPatch(adapter, (ImagePrompt(embeds, weight=IP_SCALE),))]), {})
        if native_name in names:
            patcher.ensure([])
            native = natives[native_name] = NativeIPAdapter(pipe, path)

            def setup(native: NativeIPAdapter = native) -> None:
                patcher.ensure([])
                for other in natives.values():
                    other.off()
                native.on()

            both = torch.cat([torch.zeros_like(embeds), embeds]).unsqueeze(1)  # [uncond, cond], one image
            out[native_name] = (setup, {"ip_adapter_image_embeds": [both]})
    return {name: out[name] for name in names}  # in VARIANTS order


def _latents(output: Any) -> Any:
    return output.frames if hasattr(output, "frames") else output.images


def bench_family(
    family: str,
    size: str,
    device: str,
    dtype_name: str,
    latent: int,
    steps: int,
    frames: int,
    repeats: int,
    wanted: tuple[str, ...],
) -> dict[str, Any]:
    import torch

    from bench.fabricate import sync
    from patching import ModelPatcher

    dtype = getattr(torch, dtype_name)
    with tempfile.TemporaryDirectory(prefix=f"bench-overhead-{family}-") as tmp:
        pipe = _pipeline(family, size, Path(tmp) / family, device, dtype)
        patcher = ModelPatcher(pipe)
        args = _call_args(pipe, family, latent, steps, frames, device, dtype)
        variants = _variants(family, size, pipe, patcher, Path(tmp), wanted, device, dtype)
        if "unpatched" not in variants:
            raise SystemExit("--variants must include unpatched (the baseline)")

        def run(name: str) -> Any:
            setup, extra = variants[name]
            setup()
            sync(device)
            started = time.perf_counter()
            output = pipe(**args, **extra, generator=torch.Generator().manual_seed(1))
            sync(device)
            return time.perf_counter() - started, _latents(output)

        times: dict[str, list[float]] = {name: [] for name in variants}
        outputs: dict[str, Any] = {}
        with torch.inference_mode():
            for name in variants:  # warm-up, and the outputs compared below
                outputs[name] = run(name)[1].float().cpu()
            for _ in range(repeats):
                for name in variants:
                    times[name].append(run(name)[0])
            again = run("unpatched")[1].float().cpu()  # every switch restored the model exactly?
        patcher.ensure([])
        unet_parameters = sum(p.numel() for p in pipe.unet.parameters())
    per_step = {name: statistics.median(samples) / steps for name, samples in times.items()}
    base = outputs["unpatched"]
    rows: dict[str, Any] = {}
    for name, seconds in per_step.items():
        rows[name] = {
            "seconds_per_step": seconds,
            "over_unpatched": seconds / per_step["unpatched"],
            "max_abs_change_vs_unpatched": float((outputs[name] - base).abs().max()),
        }
    native = {}
    for kind, native_name in NATIVE_PAIRS.items():
        if kind in per_step and native_name in per_step:
            native[kind] = {
                "ours_over_native": per_step[kind] / per_step[native_name],
                "max_abs_diff": float((outputs[kind] - outputs[native_name]).abs().max()),
                "max_abs_change_vs_unpatched": rows[kind]["max_abs_change_vs_unpatched"],
            }
    return {
        "family": family,
        "size": size,
        "device": device,
        "dtype": dtype_name,
        "latent": latent,
        "frames": frames if family == "svd" else None,
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "unet_parameters": unet_parameters,
        "variants": rows,
        "ours_vs_native": native,
        "unpatched_restored_exactly": bool(torch.equal(again, base)),
        "finite": bool(all(torch.isfinite(o).all() for o in outputs.values())),
    }


def print_result(result: dict[str, Any]) -> None:
    frames = f", {result['frames']} frames" if result["frames"] else ""
    print(
        f"{result['family']} {result['size']} (UNet {result['unet_parameters'] / 1e6:.0f}M params, {result['device']}, "
        f"{result['dtype']}, latent {result['latent']}x{result['latent']}{frames}, {result['steps']} steps, "
        f"median of {result['repeats']})"
    )
    for name, row in result["variants"].items():
        print(
            f"  {name:<28} {row['seconds_per_step'] * 1000:9.1f} ms/step  {row['over_unpatched']:5.2f}x unpatched"
            f"  max |latents - unpatched| {row['max_abs_change_vs_unpatched']:.1e}"
        )
    for kind, row in result["ours_vs_native"].items():
        print(
            f"  {kind}: ours / diffusers native {row['ours_over_native']:.2f}x   max |ours - native| "
            f"{row['max_abs_diff']:.1e} (the adapter moves the latents by {row['max_abs_change_vs_unpatched']:.1e})"
        )
    if not result["unpatched_restored_exactly"]:
        print("  WARNING: the unpatched output changed after the variants ran")
    if not result["finite"]:
        print("  WARNING: non-finite latents (random weights overflowing this dtype?)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    add_model_options(parser)
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--frames", type=int, default=4, help="svd: frames per clip")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=list(ALL_VARIANTS))
    add_output_options(parser)
    args = parser.parse_args(argv)
    prepare_libraries(args.threads)
    families = list(FAMILIES) if args.family == "all" else [args.family]
    wanted = tuple(dict.fromkeys(["unpatched", *args.variants]))

    def run(family: str) -> dict[str, Any]:
        return bench_family(
            family,
            args.size,
            args.device,
            args.dtype,
            args.latent,
            max(1, args.steps),
            max(1, args.frames),
            max(1, args.repeats),
            wanted,
        )

    return per_family(families, run, print_result, args.json)


if __name__ == "__main__":
    main()
