"""Farm vs direct diffusers: N text-to-image renders through one farm worker vs a plain loop.

The same images both ways, from the same model folder: prompts ``"a tiny test render number i"``
(one per image), seed ``--seed``, ``--steps``, guidance 5, ``--width`` x ``--height``, the model's
own scheduler (Euler, the spec's ``euler``):

- **farm**: one real worker process (``python -m farm worker --queues farm.control,farm.gpu.sd15
  --preload sd15:MODEL``, like ``farm demo``), by default on the embedded farm (SQLite, the
  filesystem broker, the local store, in a temporary folder; ``--farm services``: a scratch Postgres
  database and an empty Redis db). One job of ``--images`` items in shards of ``--shard-size``,
  timed from ``FarmClient.submit`` until the job's final state (its ``finished_at``, written by the
  finalize task together with the manifest and the contact sheet). This process polls for it only
  every 0.25 s: a 20 ms poll slowed the worker's renders by 10-20% on a 2-core machine.
- **diffusers** (the baseline): this process loads the same folder with
  ``StableDiffusionPipeline.from_pretrained`` on the same device and dtype, and loops over the
  same prompts and seeds (``torch.Generator`` seeded per image, as the farm does), saving each
  image as a PNG file, what a script without a farm does.

Both warm up first (the worker has the model pinned; one image each way), then the runs alternate
``--repeats`` times; medians. The farm's images are compared with the baseline's (largest pixel
difference, 0-255). The shard rows say where the farm's time went: denoising + PNG encoding
(``denoise_s``), the upload (store + artifact row), and the rest (scheduling, broker, leases,
finalize).

    python -m bench.farm_vs_diffusers                        # tiny sd15, CPU, 8 images of 64x64, 4 steps
    python -m bench.farm_vs_diffusers --farm services --images 16
    python -m bench.farm_vs_diffusers --size real --images 2 --steps 2 --width 256 --height 256 --repeats 1
    python -m bench.farm_vs_diffusers --size real --device cuda --images 8 --steps 20

``--size real`` writes a random-weight pipeline at SD1.5's sizes (UNet 860M parameters from
``farm.model_configs.REAL_UNETS``, the SD1.5 VAE layout, a 12-layer 768-wide CLIP text encoder over
the tiny tokenizer) into the temporary folder first: about 4 GB in float32. ``--json FILE`` writes
the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.services import PG_ADMIN, REDIS_URL, WorkerProcess, scratch_postgres, scratch_redis, stop_all, wait_ready
from bench.services import worker_env as _worker_env

GUIDANCE = 5.0
POLL_S = 0.25  # the end time comes from the job row, so the poll can be slow
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


# -- the model -------------------------------------------------------------------------------------
def build_model(size: str, folder: Path) -> Path:
    """The tiny sd15 pipeline, or (``real``) one with random weights at SD1.5's sizes."""
    from farm.tiny_models import build_tiny_model

    tiny = build_tiny_model("sd15", folder / "tiny-sd15")
    if size == "tiny":
        return tiny
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from farm.model_configs import REAL_UNETS

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None)
    cls_name, config = REAL_UNETS["sd15"]
    torch.manual_seed(0)
    pipe.unet = getattr(diffusers, cls_name)(**config, sample_size=64)
    pipe.vae = diffusers.AutoencoderKL(**SD15_VAE)
    base = pipe.text_encoder.config
    text = CLIPTextConfig(
        vocab_size=base.vocab_size,
        max_position_embeddings=77,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        **SD15_TEXT,
    )
    pipe.text_encoder = CLIPTextModel(text)
    out = folder / "real-sd15"
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the classic tokenizer files build_tiny_model adds
        source = tiny / "tokenizer" / name
        if source.is_file():
            (out / "tokenizer" / name).write_bytes(source.read_bytes())
    return out


def parameters(model: Path) -> int:
    """Parameters of the pipeline's weights (safetensors headers only)."""
    import json as _json
    import math
    import struct

    total = 0
    for file in model.rglob("*.safetensors"):
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = _json.loads(fh.read(length))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


# -- the farm ----------------------------------------------------------------------------------------
class Farm:
    """One farm (embedded or over local services) with one worker process."""

    def __init__(self, mode: str, args: argparse.Namespace, model: Path, tmp: Path, stack: ExitStack) -> None:
        from farm.client import FarmClient
        from farm.settings import FarmSettings
        from storage import migrate

        data = tmp / "farm-data"
        if mode == "embedded":
            self.settings = FarmSettings(_env_file=None, data_dir=data)
        else:
            db_url = stack.enter_context(scratch_postgres(args.pg_admin))
            broker = stack.enter_context(scratch_redis(args.redis_url))
            self.settings = FarmSettings(_env_file=None, data_dir=data, db={"url": db_url}, broker={"url": broker})
        migrate.upgrade(self.settings.database_url)
        self.client = FarmClient(self.settings)
        stack.callback(self.client.close)
        env = _worker_env(
            data,
            self.settings.database_url,
            self.settings.broker.url,
            FARM_WORKER__DEVICE=args.device,
            FARM_WORKER__DTYPE=args.dtype,
        )
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in the worker
        preload = ["--preload", f"sd15:{model}", "--loglevel", "WARNING"]
        self.workers = [
            WorkerProcess(
                "farm",
                ["worker", "--queues", "farm.control,farm.gpu.sd15", "--name", "bench-fvd-0", *preload],
                "bench-fvd-0",
                env,
                tmp / "worker.log",
            )
        ]
        stack.callback(stop_all, self.workers)
        started = time.perf_counter()
        wait_ready(self.client.app, self.workers, timeout=args.timeout)
        self.start_s = time.perf_counter() - started
        self.model = model

    def run(self, args: argparse.Namespace, prompts: list[str], timeout: float) -> dict[str, Any]:
        from sqlalchemy import select

        from storage.models import Job
        from storage.status import JOB_TERMINAL, JobStatus

        spec = {
            "model": str(self.model),
            "family": "sd15",
            "prompts": prompts,
            "seeds": [args.seed],
            "steps": args.steps,
            "guidance": GUIDANCE,
            "width": args.width,
            "height": args.height,
            "scheduler": "euler",
            "shard_size": args.shard_size,
            "output_prefix": "bench",
        }
        started, wall = time.perf_counter(), time.time()
        job_id = self.client.submit(spec)
        query = select(Job.status, Job.finished_at).where(Job.id == job_id)
        with self.client._engine.connect() as conn:
            while True:  # a slow poll: a tight one steals CPU from the worker on a small machine
                row = conn.execute(query).one()
                conn.rollback()
                if JobStatus(row.status) in JOB_TERMINAL:
                    break
                self.workers[0].check_alive()
                if time.perf_counter() - started > timeout:
                    raise RuntimeError(f"farm job {job_id} not final after {timeout:.0f}s:\n{self.workers[0].tail()}")
                time.sleep(POLL_S)
        if JobStatus(row.status) != JobStatus.SUCCEEDED:
            raise RuntimeError(f"farm job {job_id} ended {row.status}:\n{self.workers[0].tail()}")
        seconds = row.finished_at.timestamp() - wall  # submit -> the job's final state (worker clock, same host)
        rate = len(prompts) / seconds
        return {"images": len(prompts), "seconds": seconds, "images_per_s": rate, **self.stats(job_id)}

    def stats(self, job_id: Any) -> dict[str, Any]:
        """Where the job's time went, from its rows (the worker's clock, same host)."""
        from sqlalchemy import select

        from storage.models import Job, Shard

        with self.client._sessions() as session:
            job = session.get(Job, job_id)
            shards = session.execute(
                select(Shard.started_at, Shard.finished_at, Shard.timings).where(Shard.job_id == job_id)
            ).all()
        timings = [s.timings or {} for s in shards]

        def total(key: str) -> float:
            return sum(float(t.get(key, 0.0)) for t in timings)

        first = min(s.started_at for s in shards)
        last = max(s.finished_at for s in shards)
        in_shards = sum((s.finished_at - s.started_at).total_seconds() for s in shards)
        return {
            "job_id": str(job_id),
            "shards": len(shards),
            "denoise_s": total("denoise_s"),
            "upload_s": total("upload_s"),
            "load_s": total("load_s"),
            "patch_s": total("patch_s"),
            "in_shards_s": in_shards,
            "submit_to_first_claim_s": (first - job.created_at).total_seconds(),
            "first_claim_to_last_finish_s": (last - first).total_seconds(),
            "last_finish_to_final_s": (job.finished_at - last).total_seconds(),
        }

    def images(self, job_id: str) -> list[bytes]:
        arts = self.client.results(job_id)
        return [self.client.store.get_bytes(a["key"]) for a in sorted(arts, key=lambda a: a["item_index"])]


# -- the baseline ----------------------------------------------------------------------------------------
class Direct:
    """The plain diffusers loop in this process."""

    def __init__(self, model: Path, device: str, dtype: str, out: Path) -> None:
        import diffusers

        from farm.worker.devices import resolve_placement

        placement = resolve_placement(device, dtype)
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            model, dtype=placement.dtype, use_safetensors=True, local_files_only=True, safety_checker=None
        ).to(placement.device)
        self.pipe.set_progress_bar_config(disable=True)
        if type(self.pipe.scheduler).__name__ != "EulerDiscreteScheduler":
            raise RuntimeError(f"{model} ships {type(self.pipe.scheduler).__name__}; the farm job asks for euler")
        self.placement, self.out = placement, out
        out.mkdir(parents=True, exist_ok=True)

    def run(self, args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
        import torch

        generate = save = 0.0
        started = time.perf_counter()
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                image = self.pipe(
                    prompt=prompt,
                    num_inference_steps=args.steps,
                    guidance_scale=GUIDANCE,
                    width=args.width,
                    height=args.height,
                    generator=torch.Generator(device="cpu").manual_seed(args.seed),
                    output_type="pil",
                ).images[0]
                t1 = time.perf_counter()
                image.save(self.out / f"{i:06d}.png")
                save += time.perf_counter() - t1
                generate += t1 - t0
        seconds = time.perf_counter() - started
        return {
            "images": len(prompts),
            "seconds": seconds,
            "images_per_s": len(prompts) / seconds,
            "generate_s": generate,
            "save_s": save,
        }

    def images(self, n: int) -> list[bytes]:
        return [(self.out / f"{i:06d}.png").read_bytes() for i in range(n)]


def max_pixel_diff(a: list[bytes], b: list[bytes]) -> float:
    import numpy as np
    from PIL import Image

    if len(a) != len(b):
        raise RuntimeError(f"{len(a)} farm images vs {len(b)} direct ones")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        pa = np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.int16)
        pb = np.asarray(Image.open(io.BytesIO(y)).convert("RGB"), dtype=np.int16)
        worst = max(worst, float(np.abs(pa - pb).max()))
    return worst


# -- the run ----------------------------------------------------------------------------------------------
def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build_model(args.size, tmp / "models")
    build_s = time.perf_counter() - started
    prompts = [f"a tiny test render number {i}" for i in range(args.images)]
    with ExitStack() as stack:
        farm = Farm(args.farm, args, model, tmp, stack)
        direct = Direct(model, args.device, args.dtype, tmp / "direct")
        farm.run(args, prompts[:1], args.timeout)  # warm-up: the first render of a process
        direct.run(args, prompts[:1])
        farm_runs: list[dict[str, Any]] = []
        direct_runs: list[dict[str, Any]] = []
        for i in range(args.repeats):  # alternate the order: direct, farm, farm, direct, ...
            for name in ("direct", "farm") if i % 2 == 0 else ("farm", "direct"):
                if name == "farm":
                    farm_runs.append(farm.run(args, prompts, args.timeout))
                else:
                    direct_runs.append(direct.run(args, prompts))
        diff = max_pixel_diff(farm.images(farm_runs[-1]["job_id"]), direct.images(len(prompts)))
        placement = direct.placement
        worker_start_s = farm.start_s
    farm_s = statistics.median(r["seconds"] for r in farm_runs)
    direct_s = statistics.median(r["seconds"] for r in direct_runs)
    keys = ("denoise_s", "upload_s", "in_shards_s", "submit_to_first_claim_s", "first_claim_to_last_finish_s")
    where = {key: statistics.median(r[key] for r in farm_runs) for key in (*keys, "last_finish_to_final_s")}
    return {
        "size": args.size,
        "farm_mode": args.farm,
        "device": placement.device,
        "dtype": placement.dtype_name,
        "images": args.images,
        "shard_size": args.shard_size,
        "steps": args.steps,
        "width": args.width,
        "height": args.height,
        "repeats": args.repeats,
        "threads": args.threads or None,
        "model_parameters": parameters(model),
        "model_build_s": build_s,
        "worker_start_s": worker_start_s,
        "farm": {"seconds": farm_s, "images_per_s": args.images / farm_s, "where": where, "runs": farm_runs},
        "direct": {
            "seconds": direct_s,
            "images_per_s": args.images / direct_s,
            "generate_s": statistics.median(r["generate_s"] for r in direct_runs),
            "save_s": statistics.median(r["save_s"] for r in direct_runs),
            "runs": direct_runs,
        },
        "farm_over_direct": farm_s / direct_s,
        "farm_overhead": farm_s / direct_s - 1.0,
        "max_pixel_diff": diff,
    }


def print_result(r: dict[str, Any]) -> None:
    f, d, w = r["farm"], r["direct"], r["farm"]["where"]
    print(
        f"{r['size']} sd15 ({r['model_parameters'] / 1e6:.1f}M parameters), {r['device']} {r['dtype']}: "
        f"{r['images']} images of {r['width']}x{r['height']}, {r['steps']} steps, shards of {r['shard_size']}; "
        f"{r['farm_mode']} farm, one worker"
    )
    print(f"  diffusers loop  {d['seconds']:8.3f} s  {d['images_per_s']:7.2f} images/s  (save {d['save_s']:.3f} s)")
    print(f"  farm            {f['seconds']:8.3f} s  {f['images_per_s']:7.2f} images/s")
    print(
        f"  farm / diffusers  {r['farm_over_direct']:.3f}x time: the farm adds {r['farm_overhead']:+.1%}; "
        f"largest pixel difference {r['max_pixel_diff']:.0f}"
    )
    rest = w["first_claim_to_last_finish_s"] - w["in_shards_s"]
    print(
        f"  farm time: submit -> first claim {w['submit_to_first_claim_s']:.3f} s, shards "
        f"{w['in_shards_s']:.3f} s (denoise + PNG {w['denoise_s']:.3f} s, upload {w['upload_s']:.3f} s, rest "
        f"{w['in_shards_s'] - w['denoise_s'] - w['upload_s']:.3f} s), between shards {rest:.3f} s, last shard -> "
        f"job final {w['last_finish_to_final_s']:.3f} s"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    parser.add_argument("--farm", choices=["embedded", "services"], default="embedded")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=4, help="images per shard")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=None, help="default 64 (tiny) or 512 (real)")
    parser.add_argument("--height", type=int, default=None, help="default 64 (tiny) or 512 (real)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads on both sides (0: torch's default, all cores)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one farm run may take")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="--farm services: Postgres allowed to CREATE DATABASE")
    parser.add_argument("--redis-url", default=REDIS_URL, help="--farm services: an empty Redis db (flushed)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    default_side = 64 if args.size == "tiny" else 512
    args.width, args.height = args.width or default_side, args.height or default_side
    args.images, args.repeats = max(1, args.images), max(1, args.repeats)
    args.shard_size = max(1, args.shard_size)
    with tempfile.TemporaryDirectory(prefix="bench-fvd-") as tmp:
        result = bench(args, Path(tmp))
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
