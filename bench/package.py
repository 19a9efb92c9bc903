"""Dataset packaging: ``package_bulk`` (WebDataset and Parquet) vs plain tarfile writing of the same bytes.

For each row count, synthetic rows are written straight into a temporary SQLite database (a bulk
job, its shards and one artifact row per rendered row, with the parameters a worker records)
and a local store (one noise PNG per row, ``--image-side`` pixels square, so PNG cannot shrink
it). Then, each in a fresh subprocess (so ``ru_maxrss`` is that run's own peak):

1. ``webdataset``: ``package_bulk(..., "webdataset", shard_size)`` into a folder.
2. ``parquet``: the same as Parquet.
3. ``again``: ``package_bulk`` webdataset once more over the finished package (nothing new: the
   cost of deciding there is nothing to do).
4. Baseline: the same images read from the store in key order and written with ``tarfile`` into
   shards of the same size, with no database, metadata, checks or manifest.

Before the runs every image is read once, so all four find them in the page cache. Printed per
run: rows/s, seconds, peak RSS (``VmHWM``, reset after the imports through
``/proc/self/clear_refs``: ``ru_maxrss`` would carry the parent's peak across fork) and its growth
over the RSS after imports (the memory packaging itself took), and the ratio to the baseline.

    python -m bench package --rows 10000 100000 --repeats 2
    python -m bench package --rows 200 --image-side 16      # a quick check

``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "model": "/models/sd15",
    "family": "sd15",
    "prompts": ["a dataset image"],
    "seeds": [1],
    "steps": 1,
    "width": 64,
    "height": 64,
    "shard_size": 100,
    "output_prefix": "datasets",
}
MODEL_HASH = "ab" * 32


def noise_png(side: int, seed: int) -> bytes:
    """A valid ``side`` x ``side`` RGB PNG of random pixels (no PIL needed)."""
    rng = random.Random(seed)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rng.randbytes(side * 3) for _ in range(side))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b"")


def fabricate_bulk(
    session_factory: Any,
    store: Any,
    name: str,
    rows: int,
    *,
    image_side: int = 64,
    failed_shards: tuple[int, ...] = (),
    folder: Path | None = None,
    distinct_images: int = 512,
) -> dict[str, Any]:
    """Bulk job ``name`` with ``rows`` rows as if workers had rendered them: every row of the
    render shards in ``failed_shards`` failed (no artifact, shard FAILED with an error), every
    other row has its artifact row and its PNG in ``store``. With ``folder`` (the root of a
    local store) images are written there directly, without the store's fsync per object.
    Called again with more rows (the next night), only the new rows' shards are made. Returns
    the counts."""
    import hashlib

    from sqlalchemy import select

    from farm.bulk import submit_bulk
    from farm.bulk_manifest import read_manifest
    from storage.chunking import insert_rows
    from storage.db import session_scope
    from storage.models import Artifact, BulkJob, Job, Shard, utcnow
    from storage.status import ShardStatus

    images = [noise_png(image_side, i) for i in range(min(distinct_images, rows) or 1)]
    digests = [hashlib.sha256(image).hexdigest() for image in images]
    manifest = "\n".join(json.dumps({"id": f"r{i:07d}", "prompt": f"sample {i % 13}"}) for i in range(rows))
    with session_scope(session_factory) as session:
        submit_bulk(session, name, BASE, read_manifest(manifest.encode(), "rows.jsonl"))
    artifacts, failed = [], 0
    with session_scope(session_factory) as session:
        bulk_id = session.scalar(select(BulkJob.id).where(BulkJob.name == name))
        shards = session.scalars(
            select(Shard).join(Job, Job.id == Shard.job_id).where(Job.bulk_id == bulk_id).order_by(Shard.index)
        ).all()
        for shard in shards:
            if shard.status != ShardStatus.PENDING:  # fabricated by an earlier call
                continue
            if shard.index in failed_shards:
                shard.status, shard.error = ShardStatus.FAILED, f"shard {shard.index}: injected fault (bench)"
                failed += shard.items_total
                continue
            shard.status, shard.items_done = ShardStatus.SUCCEEDED, shard.items_total
            for position, item in enumerate(shard.params["items"]):
                n = int(item["row_id"][1:]) % len(images)
                params = {
                    "prompt": item["prompt"],
                    "negative_prompt": "",
                    "seed": item["seed"],
                    "steps": 1,
                    "guidance": 7.5,
                    "width": image_side,
                    "height": image_side,
                    "scheduler": "ddim",
                    "model": BASE["model"],
                    "model_hash": MODEL_HASH,
                    "patches": [],
                    "row_id": item["row_id"],
                }
                artifacts.append(
                    {
                        "id": uuid.uuid4(),
                        "created_at": utcnow(),
                        "job_id": shard.job_id,
                        "shard_id": shard.id,
                        "key": item["key"],
                        "item_index": position,
                        "seed": item["seed"],
                        "sha256": digests[n],
                        "size_bytes": len(images[n]),
                        "content_type": "image/png",
                        "params": params,
                        "model_hash": MODEL_HASH,
                        "fencing_token": 1,
                    }
                )
                if folder is not None:
                    path = folder / item["key"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(images[n])
                else:
                    store.put_bytes(item["key"], images[n])
        insert_rows(session, Artifact, artifacts)
    return {"rows": rows, "rendered": len(artifacts), "failed": failed}


def _child(args: argparse.Namespace) -> None:
    """One measured run in this (fresh) process; prints its figures as JSON."""
    from storage.db import make_engine, make_session_factory
    from storage.objects import LocalStore

    engine = make_engine(args.db)
    factory = make_session_factory(engine)
    store = LocalStore(args.store)
    from farm.datasets.package import package_bulk  # imported before the baseline RSS is taken

    if args.mode == "parquet":
        import pyarrow.parquet  # noqa: F401  (imports are not packaging's memory)
    before = _reset_peak()
    started = time.perf_counter()
    if args.mode == "baseline":
        from sqlalchemy import select

        from storage.models import Artifact

        with factory() as session:
            keys = session.scalars(select(Artifact.key).order_by(Artifact.key)).all()
        rows = _plain_tars(store, keys, Path(args.out), args.shard_size)
    else:
        form = "parquet" if args.mode == "parquet" else "webdataset"
        report = package_bulk(factory, store, args.name, form, args.shard_size, args.out)
        rows = report["new_rows"] if args.mode != "again" else report["packaged"]
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    figures = {"mode": args.mode, "rows": rows, "seconds": seconds, "peak_kib": peak, "growth_kib": peak - before}
    print(json.dumps(figures))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def _reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS (Linux); returns the current RSS in KiB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _warm(folder: Path) -> None:
    """Read every image once (the page cache then serves every run alike)."""
    for path in folder.rglob("*.png"):
        path.read_bytes()


def _plain_tars(store: Any, keys: list[str], out: Path, shard_size: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(keys), shard_size):
        with tarfile.open(out / f"{start // shard_size:05d}.tar", "w") as tar:
            for key in keys[start : start + shard_size]:
                data = store.get_bytes(key)
                info = tarfile.TarInfo(key.rsplit("/", 1)[-1])
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(keys)


def _measure(mode: str, db: str, store: Path, name: str, out: Path, shard_size: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.package", "--child", mode, "--db", db, "--store", str(store)]
    cmd += ["--name", name, "--out", str(out), "--shard-size", str(shard_size)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(tmp: Path, rows: int, shard_size: int, image_side: int, repeats: int = 1) -> dict[str, Any]:
    from storage import migrate
    from storage.db import make_engine, make_session_factory

    folder = tmp / f"run-{rows}"
    db = f"sqlite:///{folder / 'farm.db'}"
    folder.mkdir()
    migrate.upgrade(db)
    engine = make_engine(db)
    name = f"bench-{rows}"
    started = time.perf_counter()
    factory = make_session_factory(engine)
    made = fabricate_bulk(factory, None, name, rows, image_side=image_side, folder=folder / "objects")
    engine.dispose()
    fabricate_s = time.perf_counter() - started
    _warm(folder / "objects")
    runs: dict[str, dict[str, Any]] = {}
    for _ in range(max(1, repeats)):  # the fastest of the repeats (the host is shared), the largest peak
        for mode, out in (("baseline", "plain"), ("webdataset", "wds"), ("again", "wds"), ("parquet", "parquet")):
            run = _measure(mode, db, folder / "objects", name, folder / out, shard_size)
            best = runs.setdefault(mode, run)
            best["seconds"] = min(best["seconds"], run["seconds"])
            best["peak_kib"], best["growth_kib"] = (
                max(best["peak_kib"], run["peak_kib"]),
                max(best["growth_kib"], run["growth_kib"]),
            )
        for out in ("plain", "wds", "parquet"):
            shutil.rmtree(folder / out, ignore_errors=True)
    result = {"rows": rows, "image_side": image_side, "shard_size": shard_size, "fabricate_s": fabricate_s, **made}
    result["repeats"] = max(1, repeats)
    result["runs"] = runs
    return result


def print_result(result: dict[str, Any]) -> None:
    base = result["runs"]["baseline"]
    print(
        f"\n{result['rows']} rows, {result['image_side']}px noise PNGs, shards of {result['shard_size']} "
        f"(fabricated in {result['fabricate_s']:.1f}s)"
    )
    print(f"  {'run':<11} {'rows':>7} {'seconds':>8} {'rows/s':>8} {'peak RSS':>9} {'growth':>8} {'time/baseline':>13}")
    for mode, run in result["runs"].items():
        rate = run["rows"] / run["seconds"] if run["seconds"] else 0.0
        ratio = run["seconds"] / base["seconds"] if base["seconds"] else 0.0
        print(
            f"  {mode:<11} {run['rows']:>7} {run['seconds']:>8.2f} {rate:>8.0f} "
            f"{run['peak_kib'] / 1024:>7.0f}MB {run['growth_kib'] / 1024:>6.0f}MB {ratio:>12.2f}x"
        )


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--image-side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode; the fastest is shown")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("baseline", "webdataset", "again", "parquet"), help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.mode = args.child
        _child(args)
        return None
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-package-") as tmp:
        for rows in args.rows:
            result = bench(Path(tmp), rows, args.shard_size, args.image_side, args.repeats)
            print_result(result)
            results.append(result)
    out = {"results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
