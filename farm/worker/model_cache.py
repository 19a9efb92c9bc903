"""Pinned models: each worker process keeps its diffusers pipelines resident.

A :class:`ModelCache` is owned by one worker process (created at worker start, never a module
global). It loads a pipeline once, hands out the same object on every later request, and
evicts the least recently used pipeline when the memory budget would be exceeded.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import UserError
from farm.worker.devices import Placement
from farm.worker.memory import release_memory

PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "svd": "StableVideoDiffusionPipeline",
}


class ModelLoadError(UserError):
    """The model reference cannot be loaded (missing folder, wrong family, corrupt weights)."""


@dataclass
class LoadedModel:
    """A resident pipeline and what the cache knows about it."""

    key: tuple[str, str]
    pipeline: Any
    model_hash: str
    size_bytes: int
    load_seconds: float
    last_used: float = field(default_factory=time.monotonic)
    patcher: Any = None  # patching.ModelPatcher, created when a job first applies patches
    derived: dict[Any, Any] = field(default_factory=dict)  # pipelines built on it (from_pipe); evicted with it


def model_fingerprint(path: Path) -> str:
    """A stable hash of a local model folder (or one weight file): its JSON configs' bytes and its
    weight files' names and sizes (cheap: weights are not read)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        if file.suffix in {".json", ".txt"}:
            digest.update(rel.encode() + b"\0" + file.read_bytes() + b"\0")
        elif file.suffix in {".safetensors", ".bin", ".onnx", ".pt"}:
            digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
    return digest.hexdigest()


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def load_pipeline(model: str, family: str, placement: Placement) -> tuple[Any, str]:
    """Load a diffusers pipeline of ``family`` from a local folder (or a hub id when the hub is
    reachable) onto the placement's device; returns it with its model hash."""
    import diffusers

    if family not in PIPELINE_CLASSES:
        raise ModelLoadError(f"model family {family!r} is not one of {', '.join(PIPELINE_CLASSES)}")
    path = Path(model)
    local = path.is_dir()
    if not local and (model.startswith(("/", ".", "~")) or model.count("/") != 1):
        raise ModelLoadError(f"model {model!r}: no such folder (and not a hub id of the form org/name)")
    if local:
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"model {model!r}: {index} is missing; not a diffusers pipeline folder")
        try:
            config = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
            raise ModelLoadError(
                f"model {model!r}: {index.name} is not a readable JSON file ({_first_line(exc)})"
            ) from None
        declared = config.get("_class_name", "") if isinstance(config, dict) else ""
        expected = PIPELINE_CLASSES[family]
        if declared != expected:
            what = f"a {declared}" if declared else "not a pipeline folder (model_index.json names no _class_name)"
            raise ModelLoadError(f"model {model!r} is {what}, not a {expected} (family {family})")
    cls = getattr(diffusers, PIPELINE_CLASSES[family])
    try:
        pipeline = cls.from_pretrained(model, dtype=placement.dtype, use_safetensors=True, local_files_only=local)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"model {model!r} could not be loaded: {_first_line(exc)}") from None
    pipeline.to(placement.device)
    pipeline.set_progress_bar_config(disable=True)
    model_hash = model_fingerprint(path) if local else hashlib.sha256(model.encode()).hexdigest()
    return pipeline, model_hash


def pipeline_bytes(pipeline: Any) -> int:
    total = 0
    for component in getattr(pipeline, "components", {}).values():
        parameters = getattr(component, "parameters", None)
        if callable(parameters):
            total += sum(p.numel() * p.element_size() for p in parameters())
    return total


class ModelCache:
    """LRU cache of loaded pipelines under a memory budget; counts loads and hits."""

    def __init__(
        self,
        placement: Placement,
        budget_bytes: int,
        loader: Callable[[str, str, Placement], tuple[Any, str]] = load_pipeline,
    ) -> None:
        self.placement = placement
        self.budget_bytes = budget_bytes
        self._loader = loader
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.hits = 0
        self.evictions = 0

    def get(self, model: str, family: str) -> LoadedModel:
        key = (model, family)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                self._models.move_to_end(key)
                loaded.last_used = time.monotonic()
                self.hits += 1
                return loaded
            started = time.perf_counter()
            pipeline, model_hash = self._loader(model, family, self.placement)
            loaded = LoadedModel(key, pipeline, model_hash, pipeline_bytes(pipeline), time.perf_counter() - started)
            self.loads += 1
            self._models[key] = loaded
            self._evict(keep=key)
            return loaded

    def _evict(self, keep: tuple[str, str]) -> None:
        before = self.evictions
        while self.resident_bytes > self.budget_bytes and len(self._models) > 1:
            oldest = next(k for k in self._models if k != keep)
            del self._models[oldest]
            self.evictions += 1
        if self.evictions > before:  # only when this load pushed a model out (gc costs ~0.25 s)
            release_memory(self.placement.device)

    @property
    def resident_bytes(self) -> int:
        return sum(m.size_bytes for m in self._models.values())

    def resident(self) -> list[tuple[str, str]]:
        return list(self._models)

    def stats(self) -> dict[str, Any]:
        return {
            "loads": self.loads,
            "hits": self.hits,
            "evictions": self.evictions,
            "resident": [f"{family}:{model}" for model, family in self._models],
            "resident_bytes": self.resident_bytes,
        }
