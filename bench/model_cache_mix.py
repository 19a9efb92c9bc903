"""Pinned-model cache hits in a mixed job stream: routed by family vs one unrouted worker.

A seeded stream of jobs (each ``--shards`` shards) over ``--models`` models per family (sd15, sdxl,
svd; families drawn 50/30/20, models within a family by a Zipf-like popularity) is played through
real :class:`farm.worker.model_cache.ModelCache` objects with their real loader
(:func:`~farm.worker.model_cache.load_pipeline`, a diffusers ``from_pretrained`` of a pipeline
folder onto the device), one ``cache.get`` per shard, as ``_render_items`` does:

- ``routed``: one worker per family queue (:func:`farm.sharding.queue_for`), each with its own cache;
- ``unrouted``: the baseline, a single worker taking the whole stream;
- ``unrouted_pool``: as many workers as ``routed`` (one per family) taking shards in turn from one
  shared queue (what routing buys at the same GPU count).

Every worker gets the same memory budget: ``--capacity`` times the largest model (so at least that
many models stay resident; the cache evicts least recently used). Reported per setup: hits, loads,
evictions, hit rate, and the time spent in loads (wall time of the ``get`` calls that loaded,
medians over ``--repeats`` replays with fresh caches).

    python -m bench.model_cache_mix                                   # tiny models on CPU
    python -m bench.model_cache_mix --size real --device cuda --dtype float16 --jobs 24

Tiny models have different weights per model. ``--size real`` writes one pipeline per family with a
real-size random UNet (tiny VAE, text and image encoders) and makes the family's other models
folders of symlinks to it: the same bytes on disk, loaded as different models. ``--json FILE``
writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cli import add_model_options, add_output_options, prepare_libraries, write_json

FAMILIES = ("sd15", "sdxl", "svd")
FAMILY_SHARE = {"sd15": 0.5, "sdxl": 0.3, "svd": 0.2}
SETUPS = ("routed", "unrouted", "unrouted_pool")


def make_stream(models: dict[str, list[str]], jobs: int, shards: int, seed: int) -> list[tuple[str, str]]:
    """``(model, family)`` per shard, in arrival order (a job's shards arrive together)."""
    rng = random.Random(seed)
    families = list(models)
    stream = []
    for _ in range(jobs):
        family = rng.choices(families, weights=[FAMILY_SHARE[f] for f in families])[0]
        candidates = models[family]
        model = rng.choices(candidates, weights=[1 / (rank + 1) for rank in range(len(candidates))])[0]
        stream.extend([(model, family)] * shards)
    return stream


def write_models(
    size: str, folder: Path, per_family: int, device: str, dtype: Any, families: tuple[str, ...] = FAMILIES
) -> dict[str, list[str]]:
    from bench.fabricate import link_copy, write_real_pipeline
    from farm.tiny_models import build_tiny_model

    models: dict[str, list[str]] = {}
    for family in families:
        paths = []
        for index in range(per_family):
            path = folder / f"{family}-{index}"
            if size == "tiny":
                build_tiny_model(family, path, seed=index)
            elif index == 0:
                write_real_pipeline(family, path, dtype, device)
            else:
                link_copy(folder / f"{family}-0", path)
            paths.append(str(path))
        models[family] = paths
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return models


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def play(setup: str, stream: list[tuple[str, str]], placement: Any, budget: int, pool: int) -> dict[str, Any]:
    """Replay the stream through fresh caches; the figures of this replay."""
    from bench.fabricate import sync
    from farm.families import gpu_queue
    from farm.worker.model_cache import ModelCache

    caches: dict[str, Any] = {}
    load_seconds: dict[str, float] = {}
    for index, (model, family) in enumerate(stream):
        if setup == "routed":
            worker = gpu_queue(family)
        elif setup == "unrouted":
            worker = "worker-0"
        else:
            worker = f"worker-{index % pool}"
        cache = caches.get(worker)
        if cache is None:
            cache = caches[worker] = ModelCache(placement, budget)
            load_seconds[worker] = 0.0
        loads = cache.loads
        started = time.perf_counter()
        cache.get(model, family)
        sync(placement.device)
        if cache.loads > loads:
            load_seconds[worker] += time.perf_counter() - started
    workers = {}
    for name, cache in sorted(caches.items()):
        stats = cache.stats()
        workers[name] = {
            "hits": stats["hits"],
            "loads": stats["loads"],
            "evictions": stats["evictions"],
            "load_s": load_seconds[name],
            "resident": stats["resident"],
        }
    caches.clear()
    _release(placement.device)
    hits = sum(w["hits"] for w in workers.values())
    loads = sum(w["loads"] for w in workers.values())
    return {
        "workers": workers,
        "hits": hits,
        "loads": loads,
        "evictions": sum(w["evictions"] for w in workers.values()),
        "hit_rate": hits / max(hits + loads, 1),
        "load_s": sum(w["load_s"] for w in workers.values()),
    }


def bench(
    size: str,
    device: str,
    dtype_name: str,
    per_family: int,
    jobs: int,
    shards: int,
    capacity: float,
    repeats: int,
    seed: int,
    families: tuple[str, ...] = FAMILIES,
) -> dict[str, Any]:
    import torch

    from bench.fabricate import safetensors_numel
    from farm.worker.devices import Placement

    dtype = getattr(torch, dtype_name)
    placement = Placement(device, dtype_name)
    element = torch.empty((), dtype=dtype).element_size()
    with tempfile.TemporaryDirectory(prefix="bench-cache-mix-") as tmp:
        models = write_models(size, Path(tmp), per_family, device, dtype, families)
        sizes = {f: safetensors_numel(Path(paths[0])) * element for f, paths in models.items()}
        budget = int(capacity * max(sizes.values()))
        stream = make_stream(models, jobs, shards, seed)
        replays: dict[str, list[dict[str, Any]]] = {name: [] for name in SETUPS}
        for _ in range(repeats):  # interleaved: each setup once per round, fresh caches
            for name in SETUPS:
                replays[name].append(play(name, stream, placement, budget, len(families)))
    setups = {}
    for name, runs in replays.items():
        figures = dict(runs[0])
        figures["load_s"] = statistics.median(r["load_s"] for r in runs)
        figures["seconds_per_load"] = figures["load_s"] / max(figures["loads"], 1)
        setups[name] = figures
    base = setups["unrouted"]
    for figures in setups.values():
        figures["loads_over_unrouted"] = figures["loads"] / max(base["loads"], 1)
        figures["load_s_over_unrouted"] = figures["load_s"] / max(base["load_s"], 1e-9)
    shard_counts = {f: sum(1 for _, fam in stream if fam == f) for f in families}
    return {
        "size": size,
        "device": device,
        "dtype": dtype_name,
        "models_per_family": per_family,
        "jobs": jobs,
        "shards_per_job": shards,
        "shards": len(stream),
        "shards_per_family": shard_counts,
        "distinct_models_used": len(set(stream)),
        "model_bytes": sizes,
        "capacity": capacity,
        "budget_bytes": budget,
        "repeats": repeats,
        "seed": seed,
        "setups": setups,
    }


def print_result(result: dict[str, Any]) -> None:
    sizes = ", ".join(f"{f} {b / 2**20:.1f} MiB" for f, b in result["model_bytes"].items())
    print(
        f"{result['shards']} shards ({result['jobs']} jobs x {result['shards_per_job']}) over "
        f"{result['distinct_models_used']} models ({result['size']}, {result['device']}, {result['dtype']}: {sizes}); "
        f"budget per worker {result['budget_bytes'] / 2**20:.1f} MiB ({result['capacity']:g} x the largest), "
        f"median of {result['repeats']}"
    )
    for name, row in result["setups"].items():
        print(
            f"  {name:<14} {len(row['workers'])} worker(s)  hit rate {row['hit_rate'] * 100:5.1f}%  "
            f"hits {row['hits']:>4}  loads {row['loads']:>4}  evictions {row['evictions']:>4}  "
            f"loading {row['load_s']:8.2f} s ({row['seconds_per_load'] * 1000:.0f} ms/load)  "
            f"loads / unrouted {row['loads_over_unrouted']:.2f}x  "
            f"load time / unrouted {row['load_s_over_unrouted']:.2f}x"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--models", type=int, default=2, help="models per family")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--shards", type=int, default=2, help="shards per job")
    parser.add_argument("--capacity", type=float, default=2.0, help="worker budget in largest models")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    add_output_options(parser)
    args = parser.parse_args(argv)
    prepare_libraries(args.threads)
    result = bench(
        args.size,
        args.device,
        args.dtype,
        max(1, args.models),
        max(1, args.jobs),
        max(1, args.shards),
        args.capacity,
        max(1, args.repeats),
        args.seed,
        tuple(dict.fromkeys(args.families)),
    )
    print_result(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
