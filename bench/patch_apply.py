"""Patch apply + remove vs model load: is switching a resident model's patches cheap?

For each model family it loads the pipeline from disk (the baseline: what a worker without pinned
models would pay per job), then applies and removes each attention-multiplier patch on the
resident model, and prints medians and the ratio load / (apply + remove).

    python -m bench.patch_apply                       # tiny sd15, sdxl, svd on CPU
    python -m bench.patch_apply --size real --family sd15 --device cuda --dtype float16

``--size real`` builds random weights at the real UNet sizes (SD1.5, SDXL, SVD) and times the
UNet alone (load = ``from_pretrained`` of the saved UNet folder), since the multipliers patch
the UNet. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from farm.model_configs import REAL_UNETS

TINY_PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "svd": "StableVideoDiffusionPipeline",
}


def _patches(family: str) -> dict[str, list[Any]]:
    import patching

    out = {
        "self_attention_multiply": [patching.UNetSelfAttentionMultiply(q=1.1, k=0.9, v=1.2, out=0.8)],
        "cross_attention_multiply": [patching.UNetCrossAttentionMultiply(q=1.1, k=0.9, v=1.2, out=0.8)],
        "temporal_attention_multiply": [
            patching.UNetTemporalAttentionMultiply(
                self_structural=1.1, self_temporal=1.3, cross_structural=0.9, cross_temporal=0.7
            )
        ],
    }
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _build(family: str, size: str, folder: Path, dtype: Any) -> tuple[Any, Any]:
    """Write the model under ``folder``; return a loader (folder -> module) for the baseline."""
    import diffusers
    import torch

    if size == "tiny":
        from farm.tiny_models import build_tiny_model

        build_tiny_model(family, folder)
        cls = getattr(diffusers, TINY_PIPELINES[family])

        def load(device: str) -> Any:
            pipe = cls.from_pretrained(folder, dtype=dtype)
            return pipe.to(device)

        return load, cls
    cls_name, config = REAL_UNETS[family]
    cls = getattr(diffusers, cls_name)
    torch.manual_seed(0)
    cls(**config).to(dtype).save_pretrained(folder, safe_serialization=True)

    def load(device: str) -> Any:
        return cls.from_pretrained(folder, dtype=dtype).to(device)

    return load, cls


def bench_family(family: str, size: str, device: str, dtype_name: str, repeats: int) -> dict[str, Any]:
    import torch

    from patching import ModelPatcher

    dtype = getattr(torch, dtype_name)
    with tempfile.TemporaryDirectory(prefix=f"bench-{family}-") as tmp:
        load, _ = _build(family, size, Path(tmp) / family, dtype)
        load_times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model = load(device)
            _sync(device)
            load_times.append(time.perf_counter() - started)
            if len(load_times) < repeats:
                del model
        patcher = ModelPatcher(model)
        unet = patcher.components["unet"]
        # safetensors are memory-mapped: from_pretrained alone defers reading. A worker pays for
        # the bytes when they first move (to the GPU, or page in on first use); time one full copy.
        started = time.perf_counter()
        for module in patcher.components.values():
            for param in module.parameters():
                param.data = param.data.clone()
        _sync(device)
        copy_s = time.perf_counter() - started
        parameters = sum(p.numel() for p in unet.parameters())
        result: dict[str, Any] = {
            "family": family,
            "size": size,
            "device": device,
            "dtype": dtype_name,
            "unet_parameters": parameters,
            "load_s": _median(load_times),
            "load_and_copy_s": _median(load_times) + copy_s,
            "patches": {},
        }
        for name, patches in _patches(family).items():
            applies, removes, changed = [], [], 0
            for _ in range(repeats):
                handle = patcher.apply(patches)
                applies.append(handle.apply_seconds)
                changed = len(handle.changed_parameters)
                handle.remove()
                removes.append(patcher.last_remove_seconds)
            apply_s, remove_s = _median(applies), _median(removes)
            result["patches"][name] = {
                "changed_parameters": changed,
                "apply_s": apply_s,
                "remove_s": remove_s,
                "load_over_apply_remove": result["load_s"] / max(apply_s + remove_s, 1e-9),
                "load_and_copy_over_apply_remove": result["load_and_copy_s"] / max(apply_s + remove_s, 1e-9),
            }
    return result


def print_result(result: dict[str, Any]) -> None:
    head = (
        f"{result['family']} ({result['size']}, {result['device']}, {result['dtype']}, "
        f"UNet {result['unet_parameters'] / 1e6:.1f}M params): load {result['load_s'] * 1000:.1f} ms, "
        f"load + one copy of the weights {result['load_and_copy_s'] * 1000:.1f} ms"
    )
    print(head)
    for name, row in result["patches"].items():
        print(
            f"  {name:<28} {row['changed_parameters']:>5} params  apply {row['apply_s'] * 1000:8.2f} ms"
            f"  remove {row['remove_s'] * 1000:8.2f} ms  load/(apply+remove) {row['load_over_apply_remove']:7.1f}x"
            f"  (load+copy)/(apply+remove) {row['load_and_copy_over_apply_remove']:7.1f}x"
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "svd", "all"], default="all")
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    families = ["sd15", "sdxl", "svd"] if args.family == "all" else [args.family]
    results = []
    for family in families:
        result = bench_family(family, args.size, args.device, args.dtype, max(1, args.repeats))
        print_result(result)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
