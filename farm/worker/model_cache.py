"""Pinned models: each worker process keeps its diffusers pipelines resident.

A :class:`ModelCache` is owned by one worker process (created at worker start, never a module
global). It loads a pipeline once, hands out the same object on every later request, and
evicts the least recently used pipeline when the memory budget would be exceeded (never the one
being handed out). A second cache of the same kind holds the auxiliary components (IP-Adapters,
image encoders, ControlNets, face analysis) under its own budget. :meth:`ModelCache.clear`
drops everything at worker shutdown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import UserError
from farm.file_digests import content_fingerprint
from farm.model_refs import is_registry_ref, parse_registry_ref
from farm.model_registry import PIPELINE_CLASSES
from farm.worker.devices import Placement
from farm.worker.memory import release_memory

log = logging.getLogger(__name__)


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
    loras: Any = None  # farm.worker.lora_stack.LoraAdapters, created when a job first has LoRAs
    derived: dict[Any, Any] = field(default_factory=dict)  # pipelines built on it (from_pipe); evicted with it


def model_fingerprint(path: Path) -> str:
    """The content hash of a local model folder (or one weight file): every file's relative path
    and SHA-256, each file read once and remembered per (path, size, mtime, inode), so weights
    replaced in place get a new hash (:func:`farm.file_digests.content_fingerprint`)."""
    return content_fingerprint(path)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def missing_path_message(label: str, given: str, what: str = "folder") -> str:
    """``model './models/sd15': no such folder on worker host gpu-01 (relative paths are resolved
    against this worker's working folder /srv/farm: /srv/farm/models/sd15)``."""
    host = socket.gethostname()
    path = Path(given).expanduser()
    if given.startswith("~"):
        where = f" (~ is the home folder of the worker's user: {path})"
    elif not path.is_absolute():
        where = f" (relative paths are resolved against this worker's working folder {Path.cwd()}: {Path.cwd() / path})"
    else:
        where = ""
    return f"{label} {given!r}: no such {what} on worker host {host}{where}"


HUB_OFFLINE_HINTS = (
    "local_files_only",
    "outgoing traffic has been disabled",
    "offline mode",
    "couldn't connect",
    "connection",
    "name or service not known",
    "temporary failure in name resolution",
    "not fully cached",
)


def _hub_message(model: str, exc: BaseException) -> str:
    """Why a hub id did not load, in words a farm user can act on: with no network, the model is
    simply not on this machine, and the fix is a local folder (never ``local_files_only``)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or any(hint in text for hint in HUB_OFFLINE_HINTS):
        return (
            f"model {model!r} is not on this machine: it is a Hugging Face hub id, worker host "
            f"{socket.gethostname()} has no copy in its hub cache {_hub_cache()}, and the hub cannot be reached. "
            f"Download it where there is network (`hf download {model} --local-dir DIR`), copy DIR to the worker "
            "hosts and set the job's model to that folder (an absolute path, or one starting with ./ that "
            "each worker resolves against its working folder)"
        )
    return (
        f"model {model!r} could not be loaded from the Hugging Face hub: {_first_line(exc)} "
        "(a local folder must be an absolute path or start with ./)"
    )


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):  # pragma: no cover - huggingface_hub comes with diffusers
        return "~/.cache/huggingface/hub"


def load_pipeline(
    model: str, family: str, placement: Placement, *, models: Any = None, content_hash: str | None = None
) -> tuple[Any, str]:
    """Load a diffusers pipeline of ``family`` from a local folder (or a hub id: from this
    machine's hub cache, else from the hub when it is reachable; or a pinned registry manifest,
    materialised by ``models``, a :class:`~farm.worker.model_store.HostModelStore`) onto the
    placement's device; returns it with its model hash (the content digest: a folder's content
    fingerprint, a manifest's digest). A relative folder is resolved against the worker's working
    folder, ``~`` against its user's home."""
    import diffusers

    if is_registry_ref(model):
        digest = parse_registry_ref(model).digest
        if digest is None:
            raise ModelLoadError(f"model {model!r} was not pinned to a manifest at submit; submit the job again")
        if models is None:
            raise ModelLoadError(f"model {model!r}: this worker has no model cache folder for registry models")
        folder = models.materialise(digest)
        try:
            return load_pipeline(str(folder), family, placement, content_hash=digest)
        except BaseException:
            models.release(digest)
            raise

    if family not in PIPELINE_CLASSES:
        raise ModelLoadError(f"model family {family!r} is not one of {', '.join(PIPELINE_CLASSES)}")
    path = Path(model).expanduser()
    local = path.is_dir()
    if not local and (model.startswith(("/", ".", "~")) or model.count("/") != 1):
        if path.exists():
            raise ModelLoadError(f"model {model!r} is a file, not a diffusers pipeline folder")
        hub_like = "" if model.startswith(("/", ".", "~")) else " (and not a hub id of the form org/name)"
        raise ModelLoadError(missing_path_message("model", model) + hub_like)
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
    options = {"dtype": placement.dtype, "use_safetensors": True}
    if local:
        try:
            pipeline = cls.from_pretrained(str(path), local_files_only=True, **options)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"model {model!r} could not be loaded: {_first_line(exc)}") from None
    else:
        try:  # this machine's hub cache first: no network needed when the model is there
            pipeline = cls.from_pretrained(model, local_files_only=True, **options)
        except (OSError, ValueError, RuntimeError):
            try:
                pipeline = cls.from_pretrained(model, local_files_only=False, **options)
            except (OSError, ValueError, RuntimeError) as exc:
                raise ModelLoadError(_hub_message(model, exc)) from None
    pipeline.to(placement.device)
    pipeline.set_progress_bar_config(disable=True)
    if content_hash is not None:
        model_hash = content_hash
    else:
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
    """LRU cache of loaded pipelines (or, with another ``loader`` and ``measure``, components)
    under a memory budget; counts loads, hits and evictions. ``name`` is how its log lines call it."""

    def __init__(
        self,
        placement: Placement,
        budget_bytes: int,
        loader: Callable[[str, str, Placement], tuple[Any, str]] = load_pipeline,
        *,
        measure: Callable[[Any], int] = pipeline_bytes,
        name: str = "model cache",
        on_drop: Callable[[LoadedModel], None] | None = None,
    ) -> None:
        self.placement = placement
        self.budget_bytes = budget_bytes
        self.name = name
        self._loader = loader
        self._measure = measure
        self._on_drop = on_drop  # told of each model evicted or cleared (the host cache unpins it)
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
            loaded = LoadedModel(key, pipeline, model_hash, self._measure(pipeline), time.perf_counter() - started)
            self.loads += 1
            self._models[key] = loaded
            self._evict(keep=key)
            return loaded

    def _evict(self, keep: tuple[str, str]) -> None:
        """Least recently used first until the resident models fit the budget; never ``keep``
        (the model being handed out), which stays even when it alone is over the budget."""
        before = self.evictions
        while self.resident_bytes > self.budget_bytes and len(self._models) > 1:
            oldest = next(k for k in self._models if k != keep)
            evicted = self._models.pop(oldest)
            self.evictions += 1
            if self._on_drop is not None:
                self._on_drop(evicted)
            log.info(
                "%s: evicted %s:%s (%.1f MiB, last used %.0f s ago) to stay within its %.1f MiB budget",
                self.name,
                oldest[1],
                oldest[0],
                evicted.size_bytes / 2**20,
                time.monotonic() - evicted.last_used,
                self.budget_bytes / 2**20,
            )
        if self.evictions > before:  # only when this load pushed a model out (gc costs ~0.25 s)
            release_memory(self.placement.device)

    def clear(self) -> int:
        """Drop every resident model (with its patcher and derived pipelines), so that its memory
        is freed once nothing else holds it (the caller collects the garbage and empties the CUDA
        cache: :func:`farm.worker.memory.release_memory`); returns how many there were. A render
        that still holds one keeps it until it ends. The cache stays usable."""
        with self._lock:
            dropped = len(self._models)
            if self._on_drop is not None:
                for loaded in self._models.values():
                    self._on_drop(loaded)
            self._models.clear()
        return dropped

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
            "budget_bytes": self.budget_bytes,
        }
