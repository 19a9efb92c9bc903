"""Running out of memory during a render: recognise it, free what the failed render held, and
choose smaller settings for the next attempt instead of repeating the same one.

A shard's ``params["memory"]`` holds the limits its attempts render under (none at first):
``decode_chunk_size`` (video frames the VAE decodes at once) and ``vae_tiling`` (images decoded
in tiles). Each out-of-memory failure lowers them one step: half the decode chunk for video,
tiled decoding for images. When nothing is left to lower, the failure is final.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from farm.errors import FarmError

log = logging.getLogger(__name__)

_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


class OutOfMemory(FarmError):
    """A render ran out of memory. ``limits`` are the smaller settings for the next attempt;
    ``None`` when there are none left (the failure is final)."""

    def __init__(self, message: str, limits: dict[str, Any] | None) -> None:
        super().__init__(message, retryable=limits is not None)
        self.limits = limits


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (``torch.OutOfMemoryError``) or host allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc).lower() for m in _MESSAGES)


def release_memory(device: str) -> None:
    """Drop what a failed render left behind: Python garbage, and the CUDA cache's free blocks."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        log.info("released %.0f MiB of cached GPU memory", (before - torch.cuda.memory_reserved()) / 2**20)


def lower_limits(spec: Any, limits: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The next, smaller limits for ``spec`` after an out-of-memory at ``limits``, and what
    changes in words; ``(None, why)`` when nothing is left to lower."""
    if hasattr(spec, "decode_chunk_size"):  # video: decode fewer frames at once
        chunk = int(limits.get("decode_chunk_size", min(spec.decode_chunk_size, spec.num_frames)))
        if chunk <= 1:
            return None, "already decoding one frame at a time"
        lower = max(1, chunk // 2)
        return {
            **limits,
            "decode_chunk_size": lower,
        }, f"the next attempt decodes {lower} frames at a time (was {chunk})"
    if not limits.get("vae_tiling"):
        return {**limits, "vae_tiling": True}, "the next attempt decodes the image in tiles"
    return None, "already decoding in tiles"


def out_of_memory(exc: BaseException, spec: Any, limits: dict[str, Any], device: str) -> OutOfMemory:
    """The :class:`OutOfMemory` to record for ``exc``, after freeing memory."""
    release_memory(device)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    nxt, change = lower_limits(spec, limits)
    return OutOfMemory(f"out of memory ({first}): {change}", nxt)


@contextmanager
def vae_tiling(pipeline: Any, enabled: bool) -> Iterator[None]:
    """Decode in tiles and slices while the block runs (when ``enabled``); the resident pipeline
    is left as it was afterwards."""
    vae = getattr(pipeline, "vae", None)
    if not enabled or vae is None or not hasattr(vae, "enable_tiling"):
        yield
        return
    tiling, slicing = getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False)
    vae.enable_tiling()
    vae.enable_slicing()
    try:
        yield
    finally:
        vae.use_tiling, vae.use_slicing = tiling, slicing
