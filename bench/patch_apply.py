"""Patch apply + remove vs model load: is switching a resident model's patches cheap?

For each model family it loads the pipeline from disk (the baseline: what a worker without pinned
models would pay per job), then switches each patch kind on the resident model the way a worker
does per job (``ModelPatcher.ensure`` of the job's set, then of the next job's), and prints medians
and the ratio load / (build + apply + remove). Patch kinds:

- the attention multipliers (self, cross, temporal): weight patches, every family;
- ``ip_adapter`` / ``ip_adapter_plus`` / ``instantid`` (sd15, sdxl): per job switch = the pinned
  adapter from a :class:`~farm.worker.model_cache.ModelCache` of components (a hit, as
  ``WorkerResources.component_cache`` serves it), building the patch from it and the job's
  embeddings (new ones per repeat: a different job), ``ensure`` (fingerprint, projection of the
  image tokens, K/V per layer, processor swap) and the removal. A worker without pinned components
  would also load the adapter (``component_load_s``, through :func:`farm.worker.components.load_component`);
- ``sag`` (sd15, sdxl): Self-Attention Guidance (one processor and two hooks).

    python -m bench.patch_apply                       # tiny sd15, sdxl, svd on CPU
    python -m bench.patch_apply --size real --family sd15 --device cuda --dtype float16
    python -m bench.patch_apply --patches ip_adapter instantid sag

``--size real`` builds random weights at the real UNet sizes (SD1.5, SDXL, SVD) and adapters at the
published shapes, and times the UNet alone (load = ``from_pretrained`` of the saved UNet folder),
since every patch kind patches the UNet. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cli import add_model_options, add_output_options, per_family, prepare_libraries
from farm.model_configs import REAL_UNETS

TINY_PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "svd": "StableVideoDiffusionPipeline",
}


MULTIPLIERS = ("self_attention_multiply", "cross_attention_multiply", "temporal_attention_multiply")
ADAPTERS = ("ip_adapter", "ip_adapter_plus", "instantid")
PATCH_KINDS = (*MULTIPLIERS, *ADAPTERS, "sag")
GUIDED_FAMILIES = ("sd15", "sdxl")  # IP-Adapter, InstantID and SAG patch UNet2DConditionModel


def _multiplier(name: str) -> list[Any]:
    import patching

    if name == "self_attention_multiply":
        return [patching.UNetSelfAttentionMultiply(q=1.1, k=0.9, v=1.2, out=0.8)]
    if name == "cross_attention_multiply":
        return [patching.UNetCrossAttentionMultiply(q=1.1, k=0.9, v=1.2, out=0.8)]
    return [
        patching.UNetTemporalAttentionMultiply(
            self_structural=1.1, self_temporal=1.3, cross_structural=0.9, cross_temporal=0.7
        )
    ]


def _component_kind(name: str) -> str:
    """The component-cache kind a worker loads this adapter as (InstantID checkpoints have their
    own kind where the worker knows one)."""
    from farm.worker import components

    return "instantid" if name == "instantid" and "instantid" in components.KINDS else "ip_adapter"


def _kinds(family: str, wanted: tuple[str, ...]) -> list[str]:
    return [k for k in wanted if k in MULTIPLIERS or family in GUIDED_FAMILIES]


def _job_builder(kind: str, family: str, size: str, components: Any, path: Path, device: str, dtype: Any) -> Any:
    """``build(job) -> patches``, as a worker builds them per job from pinned components; the
    job's embeddings (computed once per job and memoised by the worker) are made beforehand."""
    from bench.fabricate import embeddings

    if kind in MULTIPLIERS:
        return lambda job: _multiplier(kind)
    if kind == "sag":
        from patching.sag import SelfAttentionGuidance

        return lambda job: [SelfAttentionGuidance(scale=0.75, blur_sigma=1.0)]
    from patching.instantid import InstantIDPatch
    from patching.ip_adapter import ImagePrompt, IPAdapterPatch

    inputs: dict[int, Any] = {}

    def prepare(job: int) -> None:
        inputs[job] = embeddings(kind, family, size, seed=1000 + job).to(device=device, dtype=dtype)

    def build(job: int) -> list[Any]:
        adapter = components.get(str(path), _component_kind(kind)).pipeline  # pinned: a cache hit
        if kind == "instantid":
            return [InstantIDPatch(adapter, inputs.pop(job), weight=0.8)]
        return [IPAdapterPatch(adapter, (ImagePrompt(inputs.pop(job), weight=0.7),))]

    build.prepare = prepare  # type: ignore[attr-defined]
    return build


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _build(family: str, size: str, folder: Path, dtype: Any, device: str = "cpu") -> tuple[Any, Any]:
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
    from bench.fabricate import real_unet

    cls = getattr(diffusers, REAL_UNETS[family][0])
    unet = real_unet(family, device, dtype)  # random init on the device (fast on a GPU)
    unet.save_pretrained(folder, safe_serialization=True)
    del unet
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    def load(device: str) -> Any:
        return cls.from_pretrained(folder, dtype=dtype).to(device)

    return load, cls


def bench_family(
    family: str, size: str, device: str, dtype_name: str, repeats: int, kinds: tuple[str, ...] = PATCH_KINDS
) -> dict[str, Any]:
    import torch

    from farm.worker.components import load_component
    from farm.worker.devices import Placement
    from farm.worker.model_cache import ModelCache
    from patching import ModelPatcher

    dtype = getattr(torch, dtype_name)
    with tempfile.TemporaryDirectory(prefix=f"bench-{family}-") as tmp:
        load, _ = _build(family, size, Path(tmp) / family, dtype, device)
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
        placement = Placement(device, dtype_name)
        components = ModelCache(placement, 1 << 62, loader=load_component)  # the worker's component cache
        for name in _kinds(family, kinds):
            row: dict[str, Any] = {"kind": name}
            path = Path(tmp) / f"adapter-{name}"
            if name in ADAPTERS:
                from bench.fabricate import write_adapter

                path = write_adapter(unet, family, name, size, path)
                component_loads = []
                for _ in range(repeats):  # what a worker without pinned components pays per job
                    started = time.perf_counter()
                    load_component(str(path), _component_kind(name), placement)
                    _sync(device)
                    component_loads.append(time.perf_counter() - started)
                row["component_load_s"] = _median(component_loads)
                components.get(str(path), _component_kind(name))  # pinned
            build = _job_builder(name, family, size, components, path, device, dtype)
            builds, applies, removes, changed, replaced = [], [], [], 0, 0
            for job in range(repeats):
                if hasattr(build, "prepare"):
                    build.prepare(job)
                started = time.perf_counter()
                patches = build(job)
                built = time.perf_counter()
                handle = patcher.ensure(patches)  # the job's set: fingerprint, collect, commit
                _sync(device)
                applied = time.perf_counter()
                patcher.ensure([])  # the next job's (empty) set: remove
                _sync(device)
                removed = time.perf_counter()
                builds.append(built - started)
                applies.append(applied - built)
                removes.append(removed - applied)
                changed, replaced = len(handle.changed_parameters), len(handle.replaced_processors)
            build_s, apply_s, remove_s = _median(builds), _median(applies), _median(removes)
            switch_s = max(build_s + apply_s + remove_s, 1e-9)
            row.update(
                changed_parameters=changed,
                replaced_processors=replaced,
                build_s=build_s,
                apply_s=apply_s,
                remove_s=remove_s,
                switch_s=build_s + apply_s + remove_s,
                load_over_apply_remove=result["load_s"] / switch_s,
                load_and_copy_over_apply_remove=result["load_and_copy_s"] / switch_s,
            )
            if "component_load_s" in row:
                row["load_with_component_over_switch"] = (result["load_s"] + row["component_load_s"]) / switch_s
            result["patches"][name] = row
    return result


def print_result(result: dict[str, Any]) -> None:
    head = (
        f"{result['family']} ({result['size']}, {result['device']}, {result['dtype']}, "
        f"UNet {result['unet_parameters'] / 1e6:.1f}M params): load {result['load_s'] * 1000:.1f} ms, "
        f"load + one copy of the weights {result['load_and_copy_s'] * 1000:.1f} ms"
    )
    print(head)
    for name, row in result["patches"].items():
        touched = (
            f"{row['changed_parameters']:>5} params"
            if row["changed_parameters"]
            else f"{row['replaced_processors']:>3} procs"
        )
        line = (
            f"  {name:<28} {touched}  build {row['build_s'] * 1000:7.2f} ms  apply {row['apply_s'] * 1000:8.2f} ms"
            f"  remove {row['remove_s'] * 1000:8.2f} ms  load/(apply+remove) {row['load_over_apply_remove']:7.1f}x"
            f"  (load+copy)/(apply+remove) {row['load_and_copy_over_apply_remove']:7.1f}x"
        )
        if "component_load_s" in row:
            line += (
                f"  adapter load {row['component_load_s'] * 1000:.1f} ms,"
                f" (load+adapter)/switch {row['load_with_component_over_switch']:.1f}x"
            )
        print(line)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "svd", "all"], default="all")
    add_model_options(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patches", nargs="+", choices=PATCH_KINDS, default=list(PATCH_KINDS))
    add_output_options(parser)
    args = parser.parse_args(argv)
    prepare_libraries(args.threads)
    families = ["sd15", "sdxl", "svd"] if args.family == "all" else [args.family]
    repeats, patches = max(1, args.repeats), tuple(args.patches)

    def run(family: str) -> dict[str, Any]:
        return bench_family(family, args.size, args.device, args.dtype, repeats, patches)

    return per_family(families, run, print_result, args.json)


if __name__ == "__main__":
    main()
