"""``python -m bench <name> [args]``: run one benchmark (``python -m bench`` lists them).

Each name is the module ``bench.<name>``, imported only when it is run, so a benchmark that is
missing from this checkout (or fails to import) is reported by name and the others still run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

BENCHES: dict[str, str] = {
    "patch_apply": "switching patches on a resident model vs loading the model",
    "lora_switch": "switching a resident model's LoRA stack vs reloading the model",
    "sag_step": "Self-Attention Guidance: our patch vs diffusers' SAG pipeline",
    "bulk_feed": "bulk renders: windowed feeding vs publishing every shard",
    "package": "dataset packaging (WebDataset, Parquet) vs plain tarfile writing, rows/s and peak memory",
    "celery_overhead": "farm overhead vs bare Celery: no-op shards vs no-op tasks (Redis, RabbitMQ)",
    "farm_vs_diffusers": "N images through one farm worker vs a plain diffusers loop",
    "patch_overhead": "step time with each patch applied vs unpatched; our IP-Adapter vs diffusers'",
    "model_cache_mix": "pinned-model cache hits in a mixed job stream: routed by family vs unrouted",
    "reconcile_pass": "one reconciler pass over 100,000 shards vs a GROUP BY over them (Postgres)",
    "api_path": "the farm API vs the direct client: submit latency, status reads, event stream",
    "pick": "choosing the next shards: one fair-share feed over 100,000 pending shards vs a bare SELECT (Postgres)",
    "gpu": "the GPU figures in one command (real sizes on a CUDA device)",
}


def usage() -> str:
    width = max(map(len, BENCHES))
    lines = ["usage: python -m bench <name> [args]   (python -m bench <name> --help for its options)", ""]
    for name, what in BENCHES.items():
        there = importlib.util.find_spec(f"bench.{name}") is not None
        lines.append(f"  {name:<{width}}  {what}{'' if there else '  (not in this checkout)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help", "help", "list"}:
        print(usage())
        return 0
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in BENCHES:
        print(f"unknown benchmark {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = f"bench.{name}"
    if importlib.util.find_spec(module_name) is None:
        print(f"benchmark {name!r} is not in this checkout (no bench/{name}.py)", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"benchmark {name!r} cannot be imported: {exc}", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"{module_name} has no main(argv)", file=sys.stderr)
        return 2
    sys.argv = [f"python -m bench {name}", *rest]  # argparse shows this in usage and errors
    entry(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
