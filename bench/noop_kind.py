"""``bench_noop``: a bench-only job kind whose "render" writes one small PNG per item.

Everything else about a ``bench_noop`` job is the production path of a text-to-image job: the spec
is validated and stored, ``farm.schedule_job`` splits it into shards on ``farm.gpu.sd15``, a worker
claims each shard under a database lease, looks the (pinned) model up in its cache, applies the
job's (empty) patch set, and the runner records every output through ``ShardRun.record`` (object
store write + artifact row + fenced lease renewal); the shard is finished, ``farm.finalize_job``
rolls the job up and writes the manifest and the contact sheet. Only the diffusers call is gone.

Nothing in ``farm`` knows this kind: importing this module registers its descriptor with the
farm's registry (:func:`farm.kinds.register_kind`). The bench process imports it
to submit jobs; ``python -m bench.farm_worker`` (``farm worker`` with this module imported) runs
the workers that execute them.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Any, ClassVar, Literal

from pydantic import Field

from farm.errors import UserError
from farm.job_spec import JobSpec
from farm.kinds import JobKind, ShardRunner, register_kind
from farm.kinds.text_to_image import prompt_major_items

KIND = "bench_noop"


def tiny_png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """A valid RGB PNG of one colour, built without PIL (zlib + CRCs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * width  # filter byte 0, then the pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


PNG = tiny_png()


class NoopItemFailed(UserError):
    """An item of a ``bench_noop`` job failed on purpose (``fail_while`` exists): not retryable,
    so the shard fails at once."""


class NoopRenderSpec(JobSpec):
    """A text-to-image spec whose items are written as a fixed 8x8 PNG instead of rendered;
    ``item_seconds``: each item takes that long first (a stand-in for a GPU's render time, for the
    scheduling tests and benches); ``fail_while``: a path on the worker; while a file is there,
    every item fails (a job that fails, then succeeds when retried after the file is gone)."""

    families: ClassVar[tuple[str, ...]] = ("sd15",)

    kind: Literal["bench_noop"] = "bench_noop"
    item_seconds: float = Field(default=0.0, ge=0.0, le=60.0)
    fail_while: str | None = Field(default=None, min_length=1, max_length=1024)


def run_noop_shard(run: Any) -> int:
    """The runner: every item not yet written gets the fixed PNG, recorded like a rendered one."""
    total = len(run.items)
    for position, item in enumerate(run.items):
        if item["key"] in run.done_keys:
            continue
        started = time.perf_counter()
        if run.spec.fail_while and os.path.exists(run.spec.fail_while):
            raise NoopItemFailed(f"item {item['key']}: failed on purpose ({run.spec.fail_while} exists)")
        if run.spec.item_seconds:
            time.sleep(run.spec.item_seconds)
            run.progress((position + 0.5) / total)  # a cancelled job or a lost lease stops here
        params = {
            "prompt": run.spec.prompts[item["prompt_index"]],
            "seed": int(item["seed"]),
            "steps": run.spec.steps,
            **run.base_params(),
        }
        run.add_time("denoise_s", time.perf_counter() - started)
        run.record(
            item["key"], PNG, "image/png", item=item, params=params, progress=(position + 1) / total, item_finished=True
        )
    return run.items_done


def runner() -> ShardRunner:
    return run_noop_shard


DESCRIPTOR = register_kind(JobKind(spec=NoopRenderSpec, items=prompt_major_items, runner=runner))
