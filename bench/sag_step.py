"""Self-Attention Guidance step time: our patch vs diffusers' StableDiffusionSAGPipeline.

One SD1.5-layout pipeline, DDIM, the same seed and settings, timed three ways in one process
(interleaved, medians over repeats): unpatched, with :class:`patching.sag.SelfAttentionGuidance`
applied, and through diffusers' (deprecated) ``StableDiffusionSAGPipeline`` built on the same
components, the baseline a user would otherwise reach for. It prints seconds per step and the
ratios, and the largest difference between our image and diffusers' (they should agree).

    python -m bench.sag_step                                  # tiny sd15 on CPU
    python -m bench.sag_step --size real --latent 64          # the SD1.5 UNet at 512x512
    python -m bench.sag_step --size real --device cuda --dtype float16

``--size real`` puts a random-weight UNet of SD1.5's size into the tiny pipeline and feeds it
random 768-wide prompt embeddings (the tiny text encoder and VAE stay: their cost is small and the
same in all three runs). ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cli import add_model_options, add_output_options, prepare_libraries, write_json
from farm.model_configs import REAL_UNETS


def _pipelines(size: str, folder: Path, device: str, dtype: Any) -> tuple[Any, Any]:
    import diffusers
    import torch
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    from farm.tiny_models import build_tiny_model

    build_tiny_model("sd15", folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    if size == "real":
        cls_name, config = REAL_UNETS["sd15"]
        torch.manual_seed(0)
        pipe.unet = getattr(diffusers, cls_name)(**config)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device=device, dtype=dtype)
    reference = StableDiffusionSAGPipeline(**pipe.components, requires_safety_checker=False)
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    return pipe, reference


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bench(size: str, device: str, dtype_name: str, latent: int, steps: int, repeats: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from patching import ModelPatcher
    from patching.sag import SelfAttentionGuidance

    dtype = getattr(torch, dtype_name)
    with tempfile.TemporaryDirectory(prefix="bench-sag-") as tmp:
        pipe, reference = _pipelines(size, Path(tmp) / "sd15", device, dtype)
        width = pipe.unet.config.cross_attention_dim
        embeds = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        pixels = latent * pipe.vae_scale_factor
        args = {
            "prompt_embeds": embeds[1:],
            "negative_prompt_embeds": embeds[:1],
            "num_inference_steps": steps,
            "guidance_scale": 7.5,
            "width": pixels,
            "height": pixels,
            "output_type": "np",
        }
        patcher = ModelPatcher(pipe)
        sag = SelfAttentionGuidance(scale=0.75, blur_sigma=1.0)  # diffusers' fixed blur

        def unpatched() -> Any:
            patcher.ensure([])
            return pipe(**args, generator=torch.Generator().manual_seed(1)).images

        def ours() -> Any:
            patcher.ensure([sag])
            return pipe(**args, generator=torch.Generator().manual_seed(1)).images

        def diffusers_sag() -> Any:
            patcher.ensure([])
            return reference(**args, sag_scale=0.75, generator=torch.Generator().manual_seed(1)).images

        runs = {"unpatched": unpatched, "ours": ours, "diffusers_sag": diffusers_sag}
        times: dict[str, list[float]] = {name: [] for name in runs}
        images: dict[str, Any] = {}
        with torch.inference_mode():
            for name, run in runs.items():  # warm-up
                images[name] = run()
            for _ in range(repeats):
                for name, run in runs.items():
                    _sync(device)
                    started = time.perf_counter()
                    run()
                    _sync(device)
                    times[name].append(time.perf_counter() - started)
        patcher.remove()
    per_step = {name: statistics.median(samples) / steps for name, samples in times.items()}
    return {
        "size": size,
        "device": device,
        "dtype": dtype_name,
        "latent": latent,
        "steps": steps,
        "repeats": repeats,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "seconds_per_step": per_step,
        "ours_over_diffusers": per_step["ours"] / per_step["diffusers_sag"],
        "ours_over_unpatched": per_step["ours"] / per_step["unpatched"],
        "diffusers_over_unpatched": per_step["diffusers_sag"] / per_step["unpatched"],
        "max_abs_diff_vs_diffusers": float(np.abs(images["ours"] - images["diffusers_sag"]).max()),
    }


def print_result(result: dict[str, Any]) -> None:
    step = result["seconds_per_step"]
    print(
        f"sd15 {result['size']} (UNet {result['unet_parameters'] / 1e6:.0f}M params, {result['device']}, "
        f"{result['dtype']}, latent {result['latent']}x{result['latent']}, {result['steps']} DDIM steps, "
        f"median of {result['repeats']})"
    )
    for name in ("unpatched", "ours", "diffusers_sag"):
        print(f"  {name:<14} {step[name] * 1000:9.1f} ms/step")
    print(
        f"  ours / diffusers SAG {result['ours_over_diffusers']:.2f}x   ours / unpatched "
        f"{result['ours_over_unpatched']:.2f}x   diffusers SAG / unpatched {result['diffusers_over_unpatched']:.2f}x"
        f"   max |ours - diffusers| {result['max_abs_diff_vs_diffusers']:.1e}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_options(parser, threads=False)
    args = parser.parse_args(argv)
    prepare_libraries()
    result = bench(args.size, args.device, args.dtype, args.latent, max(1, args.steps), max(1, args.repeats))
    print_result(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
