"""The GPU figures in one command: farm vs diffusers, patch switching vs model loads, cache hits
in a mixed job stream, and patch step overhead, at real SD1.5 / SDXL / SVD sizes on a CUDA device.

    python -m bench.gpu --json gpu-figures.json          # on a CUDA machine (fp16)
    python -m bench.gpu --allow-cpu --json cpu.json      # no GPU: the same steps, tiny, on the CPU

Each step runs as its own process (``python -m bench.<module> ... --json``; GPU memory is returned
between steps, and one step failing does not lose the others) and its JSON is folded into the one
this command writes, with the command, its wall time, and a summary of images/s, seconds/step and
load times. Steps:

- ``farm_vs_diffusers`` (``bench/farm_vs_diffusers.py``; recorded as skipped, with the reason, when
  the module is not there);
- ``patch_apply`` per family: model load vs switching each patch kind (``bench/patch_apply.py``);
- ``model_cache_mix``: cache hit rate and time spent loading, routed by family vs unrouted;
- ``patch_overhead`` per family: step time per patch vs unpatched, ours vs diffusers' IP-Adapter.

No checkpoints are needed: every model is random weights at the real sizes
(:data:`farm.model_configs.REAL_UNETS`). Without CUDA the command says so and stops, unless
``--allow-cpu`` is given: then it runs the steps at tiny sizes on the CPU (a smoke test; those are
not GPU figures, and the JSON says so).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STEPS = ("farm_vs_diffusers", "patch_apply", "model_cache_mix", "patch_overhead")
FAMILIES = ("sd15", "sdxl", "svd")
# Real sizes: SD1.5 at 512x512 (latent 64), SDXL at 1024x1024 (latent 128), SVD 14 frames at 512x512.
REAL_OVERHEAD = {
    "sd15": ["--latent", "64"],
    "sdxl": ["--latent", "128"],
    "svd": ["--latent", "64", "--frames", "14"],
}
NO_CUDA = (
    "No CUDA device is visible to this process (torch {torch}, CUDA build: {cuda}). bench.gpu records GPU "
    "figures and needs one. Run it on a CUDA machine, or add --allow-cpu to run the same steps at tiny sizes "
    "on the CPU (a smoke test: the figures are not GPU figures)."
)


def machine() -> dict[str, Any]:
    import diffusers
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count()
        )
    return info


def plan(cuda: bool, families: list[str], only: list[str], repeats: int | None, steps: int | None) -> list[dict]:
    """The steps to run: ``{"name", "module", "args"}`` (``--json`` is added when run)."""
    if cuda:
        device = ["--device", "cuda", "--dtype", "float16"]
        reps, denoise = str(repeats or 3), str(steps or 10)
        size = ["--size", "real"]
    else:
        device = ["--device", "cpu", "--dtype", "float32"]
        reps, denoise = str(repeats or 1), str(steps or 1)
        size = ["--size", "tiny"]
    out: list[dict] = []
    if "farm_vs_diffusers" in only:  # item 2: its own CLI (no --dtype: it picks fp16 on CUDA itself)
        images = "8" if cuda else "2"
        out.append(
            {
                "name": "farm_vs_diffusers",
                "module": "bench.farm_vs_diffusers",
                "args": [*size, "--device", device[1], "--steps", denoise, "--images", images, "--repeats", reps],
            }
        )
    if "patch_apply" in only:
        for family in families:
            args = [*size, "--family", family, *device, "--repeats", str(repeats or (5 if cuda else 1))]
            out.append({"name": f"patch_apply/{family}", "module": "bench.patch_apply", "args": args})
    if "model_cache_mix" in only:
        mix = ["--models", "2", "--jobs", "20", "--shards", "2"] if cuda else ["--models", "1", "--jobs", "6"]
        args = [*size, *device, *mix, "--families", *families, "--repeats", str(repeats or 1)]
        out.append({"name": "model_cache_mix", "module": "bench.model_cache_mix", "args": args})
    if "patch_overhead" in only:
        for family in families:
            shape = REAL_OVERHEAD[family] if cuda else ["--latent", "16", "--frames", "2"]
            family_steps = str(steps or 5) if cuda and family == "svd" else denoise
            args = [*size, "--family", family, *device, *shape, "--steps", family_steps, "--repeats", reps]
            out.append({"name": f"patch_overhead/{family}", "module": "bench.patch_overhead", "args": args})
    return out


def run_step(step: dict, folder: Path, timeout: float) -> dict[str, Any]:
    """Run one step as ``python -m module args --json FILE``, echoing its output; its record."""
    record: dict[str, Any] = {"module": step["module"]}
    if importlib.util.find_spec(step["module"]) is None:
        record["skipped"] = f"{step['module'].replace('.', '/')}.py is not in this checkout"
        print(f"== {step['name']}: skipped ({record['skipped']})", flush=True)
        return record
    out = folder / (step["name"].replace("/", "-") + ".json")
    command = [sys.executable, "-m", step["module"], *step["args"], "--json", str(out)]
    record["command"] = " ".join(["python", *command[1:-2]])
    print(f"== {step['name']}: {record['command']}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as exc:
        record["error"] = f"could not start: {exc}"
        return record
    watchdog = threading.Timer(timeout, process.kill)  # this step's own process only
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip())
        code = process.wait()
    finally:
        timed_out = not watchdog.is_alive()
        watchdog.cancel()
    record["seconds"] = round(time.perf_counter() - started, 1)
    if timed_out and code != 0:
        record["error"] = f"timed out after {timeout:.0f} s"
    elif code != 0:
        record["error"] = f"exit code {code}"
    if "error" in record:
        record["output_tail"] = list(tail)
        print(f"== {step['name']}: FAILED ({record['error']})", flush=True)
        return record
    try:
        record["result"] = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        record["error"] = f"no JSON written ({exc})"
        record["output_tail"] = list(tail)
    return record


def _numbers(value: Any, path: str, keys: tuple[str, ...]) -> dict[str, float]:
    """Every number under ``value`` whose key contains one of ``keys``, by dotted path."""
    found: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(item, int | float) and not isinstance(item, bool) and any(k in str(key) for k in keys):
                found[sub] = item
            else:
                found.update(_numbers(item, sub, keys))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.update(_numbers(item, f"{path}[{index}]", keys))
    return found


def summarize(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figures: images/s, seconds/step, load and switch times, cache hit rates."""
    summary: dict[str, Any] = {}
    farm = records.get("farm_vs_diffusers", {}).get("result")
    if isinstance(farm, dict) and isinstance(farm.get("farm"), dict) and isinstance(farm.get("direct"), dict):
        summary["farm_vs_diffusers"] = {
            "farm_images_per_s": farm["farm"].get("images_per_s"),
            "diffusers_images_per_s": farm["direct"].get("images_per_s"),
            "farm_over_diffusers_time": farm.get("farm_over_direct"),
            "max_pixel_diff": farm.get("max_pixel_diff"),
        }
    elif farm is not None:  # another layout: every images/s, s/step, ratio and load time it reports
        summary["farm_vs_diffusers"] = _numbers(farm, "", ("images_per_s", "per_step", "_over_", "load_s"))
    for name, record in records.items():
        result = record.get("result")
        if result is None:
            continue
        if name.startswith("patch_apply/"):
            for row in result:
                summary.setdefault("load_s", {})[row["family"]] = round(row["load_s"], 4)
                summary.setdefault("load_and_copy_s", {})[row["family"]] = round(row["load_and_copy_s"], 4)
                summary.setdefault("patch_switch_s", {})[row["family"]] = {
                    kind: round(patch["switch_s"], 5) for kind, patch in row["patches"].items()
                }
        elif name == "model_cache_mix":
            summary["model_cache_mix"] = {
                setup: {"hit_rate": round(row["hit_rate"], 3), "loads": row["loads"], "load_s": round(row["load_s"], 2)}
                for setup, row in result["setups"].items()
            }
        elif name.startswith("patch_overhead/"):
            for row in result:
                summary.setdefault("seconds_per_step", {})[row["family"]] = {
                    variant: round(v["seconds_per_step"], 5) for variant, v in row["variants"].items()
                }
                if row["ours_vs_native"]:
                    summary.setdefault("ip_adapter_ours_over_native", {})[row["family"]] = {
                        kind: round(v["ours_over_native"], 3) for kind, v in row["ours_vs_native"].items()
                    }
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("gpu-figures.json"))
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run the steps tiny on the CPU")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=None, help="override every step's repeats")
    parser.add_argument("--steps", type=int, default=None, help="override the denoising steps per run")
    parser.add_argument("--step-timeout", type=float, default=1200.0, help="seconds per step before it is killed")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr, flush=True)
        if not args.allow_cpu:
            raise SystemExit(2)
        print("--allow-cpu: running at tiny sizes on the CPU; these are NOT GPU figures.", flush=True)
    figures: dict[str, Any] = {
        "mode": "cuda, real sizes, float16" if cuda else "cpu, tiny sizes, float32 (no CUDA: a smoke run)",
        "gpu_figures": cuda,
        "machine": machine(),
        "steps": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for step in plan(cuda, args.families, args.only, args.repeats, args.steps):
            figures["steps"][step["name"]] = run_step(step, Path(tmp), args.step_timeout)
            args.json.write_text(json.dumps(figures, indent=2) + "\n")  # what is done so far survives a crash
    figures["summary"] = summarize(figures["steps"])
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    failed = [name for name, record in figures["steps"].items() if "error" in record]
    print(f"== wrote {args.json} ({figures['mode']}); failed steps: {', '.join(failed) or 'none'}", flush=True)
    return figures


if __name__ == "__main__":
    main()
