"""LoRA switch vs model reload: is changing a resident pipeline's LoRA stack per job cheap?

For each family (tiny sd15, sdxl) it writes the tiny pipeline and two tiny LoRAs (every attention
projection of the UNet and the text encoders, rank ``--rank``), then times, per repeat, on the
worker's own code (:class:`farm.worker.lora_stack.LoraAdapters`, as ``apply_job_patches`` drives it):

- ``reload``: the baseline, the pipeline loaded again with the worker's loader
  (:func:`farm.worker.model_cache.load_pipeline`): what a worker would pay to get another model;
- ``cold``: a job's stack whose LoRA is not loaded yet: read the file, ``load_lora_weights``,
  ``set_adapters`` (the first job with that LoRA on this worker);
- ``switch``: from one LoRA to the other, both already loaded (the LRU hit: ``set_adapters``);
- ``off``: back to the base model for a job without LoRAs (``disable_lora``).

It also times one denoising step with a LoRA active vs none (PEFT keeps the LoRA beside the base
weights, unfused, so every wrapped projection adds two small matmuls). Medians over ``--repeats``;
ratios are against ``reload`` measured in the same process.

    python -m bench lora_switch                  # tiny sd15 and sdxl on CPU
    python -m bench lora_switch --family sd15 --repeats 9 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from bench.cli import add_output_options, per_family, prepare_libraries


def _timed(step: Any) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def _step_time(pipe: Any, steps: int = 2) -> float:
    import torch

    generator = torch.Generator().manual_seed(0)
    args = {"num_inference_steps": steps, "width": 64, "height": 64, "guidance_scale": 1.0, "output_type": "latent"}
    return _timed(lambda: pipe(["a red cube"], generator=generator, **args)) / steps


def bench_family(family: str, repeats: int, rank: int) -> dict[str, Any]:
    from farm.file_digests import file_sha256
    from farm.tiny_components import build_tiny_lora
    from farm.tiny_models import build_tiny_model
    from farm.worker.devices import Placement
    from farm.worker.lora_stack import LoraAdapters, LoraLayer
    from farm.worker.model_cache import load_pipeline

    samples: dict[str, list[float]] = {k: [] for k in ("reload", "cold", "switch", "off", "step_base", "step_lora")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(family, root / "model")
        files = [build_tiny_lora(family, root / f"lora{i}", seed=i, rank=rank) for i in range(2)]
        placement = Placement("cpu", "float32")
        pipe, _ = load_pipeline(str(model), family, placement)
        pipe.set_progress_bar_config(disable=True)
        stacks = [[LoraLayer(str(f), f, file_sha256(f), 0.8)] for f in files]
        size = files[0].stat().st_size
        for _ in range(repeats):
            samples["reload"].append(_timed(lambda: load_pipeline(str(model), family, placement)))
            adapters = LoraAdapters(pipe, capacity=8)  # nothing loaded: the first job with a LoRA on a worker
            samples["cold"].append(_timed(lambda a=adapters: a.switch(stacks[0])))
            adapters.switch(stacks[1])
            samples["switch"].append(_timed(lambda a=adapters: a.switch(stacks[0])))
            samples["step_lora"].append(_step_time(pipe))
            samples["off"].append(_timed(lambda a=adapters: a.switch([])))
            samples["step_base"].append(_step_time(pipe))
            pipe.delete_adapters(list(adapters.loaded))
    result: dict[str, Any] = {"family": family, "repeats": repeats, "rank": rank, "lora_file_bytes": size}
    for name, values in samples.items():
        result[f"{name}_s"] = statistics.median(values)
    for name in ("cold", "switch", "off"):
        result[f"reload_over_{name}"] = result["reload_s"] / result[f"{name}_s"]
    result["step_lora_over_base"] = result["step_lora_s"] / result["step_base_s"]
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def print_result(r: dict[str, Any]) -> None:
    print(f"tiny {r['family']}: medians of {r['repeats']}, LoRA rank {r['rank']} ({r['lora_file_bytes']:,} bytes)")
    print(f"  reload (load_pipeline)     {_ms(r['reload_s']):>11}")
    for name, what in (("cold", "first load of a LoRA"), ("switch", "switch to a loaded LoRA"), ("off", "off")):
        print(f"  {what:<26} {_ms(r[f'{name}_s']):>11}   reload/{name} {r[f'reload_over_{name}']:.1f}x")
    print(
        f"  denoise step: base {_ms(r['step_base_s'])}, with LoRA {_ms(r['step_lora_s'])}"
        f" ({r['step_lora_over_base']:.2f}x)"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=4)
    add_output_options(parser)
    args = parser.parse_args(argv)
    prepare_libraries(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")  # adapters deleted between repeats
    families = ["sd15", "sdxl"] if args.family == "all" else [args.family]
    return per_family(families, lambda f: bench_family(f, max(1, args.repeats), args.rank), print_result, args.json)


if __name__ == "__main__":
    main()
