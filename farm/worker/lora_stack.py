"""A job's LoRA stack on the resident pipeline: loaded once, kept in an LRU, switched per job.

:class:`LoraAdapters` belongs to one pinned pipeline (``LoadedModel.loras``). Each LoRA file is
loaded with diffusers' PEFT integration (``load_lora_weights(..., adapter_name=...)``) under a
name made from its content digest, so the same bytes under two paths load once. A job's stack is
made active with ``set_adapters(names, adapter_weights)``; a job without LoRAs gets
``disable_lora()``: the adapters stay loaded beside the base weights (never fused into them), so
the base model's weights and outputs are bit-exact again. At most ``worker.lora_cache_size``
adapters stay loaded; the least recently used go first (``delete_adapters``), never one of the
stack being applied. :func:`farm.worker.job_patches.apply_job_patches` orders the changes: the
job's other patches come off, the stack is switched, the patches go back on.

Weights are read only from ``.safetensors`` files. A file that cannot be read or does not fit
the model fails the shard with :class:`LoraLoadFailed`, and whatever part of it was loaded is
deleted again, so the worker keeps serving with its pipeline as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import FarmError, UserError
from farm.file_digests import file_sha256
from farm.model_refs import RegistryError, is_registry_ref, parse_registry_ref
from farm.model_registry import resolve_model_ref
from farm.worker.model_cache import _first_line, missing_path_message

LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors",)  # preferred in a folder (diffusers' own name)


class LoraUnavailable(UserError):
    """A LoRA named by the job is not there for this worker (no such file, or a registry ref)."""


class LoraLoadFailed(UserError):
    """A LoRA file cannot be read or applied to the job's model."""


class LoraFileChanged(FarmError):
    """A LoRA file was replaced between its digest and its load (a retry reads it again)."""

    retryable = True


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA of a job's stack, resolved on this worker: the file, its content digest, weight."""

    ref: str
    path: Path
    sha256: str
    weight: float

    @property
    def adapter_name(self) -> str:
        return f"lora_{self.sha256[:20]}"

    def recorded(self) -> dict[str, Any]:
        """What an output records of it (its lineage)."""
        return {"model": self.ref, "weight": self.weight, "sha256": self.sha256}


def lora_file(ref: str, res: Any = None) -> Path:
    """The ``.safetensors`` file a spec's LoRA ``ref`` names on this worker. A registry reference
    (pinned to its manifest at submit) is materialised into this host's model cache through the
    worker's resources ``res`` (downloaded once per host, verified: :mod:`farm.worker.model_store`)."""
    if is_registry_ref(ref):
        if res is None:
            raise LoraUnavailable(f"LoRA {ref!r}: a registry reference needs a worker's model cache")
        try:
            digest = parse_registry_ref(ref).digest or resolve_model_ref(res.store, ref).digest
        except RegistryError as exc:
            raise LoraUnavailable(f"LoRA {ref!r}: {exc}") from None
        return _file_in(ref, res.host_models().materialise(digest))
    return _file_in(ref, Path(ref).expanduser())


def _file_in(ref: str, path: Path) -> Path:
    """The LoRA file ``path`` is, or the one ``.safetensors`` file of the folder ``path`` is."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
        preferred = [p for p in files if p.name in LORA_FILE_NAMES]
        if preferred or len(files) == 1:
            return (preferred or files)[0]
        found = ", ".join(p.name for p in files[:5]) if files else "none"
        raise LoraUnavailable(f"LoRA {ref!r}: the folder must hold one .safetensors file (found: {found})")
    if not path.is_file():
        raise LoraUnavailable(missing_path_message("LoRA", ref, "file or folder"))
    if path.suffix != ".safetensors":
        raise LoraUnavailable(f"LoRA {ref!r}: LoRA weights are read only from .safetensors files")
    return path


def stack_fingerprint(stack: list[LoraLayer]) -> str:
    """sha256 (hex) of the ordered stack: digests and weights (the empty stack has one too)."""
    described = [[layer.sha256, layer.weight] for layer in stack]
    return hashlib.sha256(json.dumps(described, separators=(",", ":")).encode()).hexdigest()


class LoraAdapters:
    """The LoRA adapters loaded into one pipeline, least recently used first."""

    def __init__(self, pipeline: Any, capacity: int) -> None:
        self.pipeline = pipeline
        self.capacity = max(1, capacity)
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> the file it came from
        self.active: list[LoraLayer] = []
        self.fingerprint = stack_fingerprint([])
        self.loads = 0

    def resolve(self, specs: list[Any], res: Any = None) -> list[LoraLayer]:
        """The job's ``loras`` as :class:`LoraLayer` objects; a file's digest is computed once
        per (path, size, mtime, inode) (:func:`farm.file_digests.file_sha256`)."""
        stack = []
        for spec in specs:
            path = lora_file(spec.model, res)
            stack.append(LoraLayer(spec.model, path, file_sha256(path), float(spec.weight)))
        return stack

    def switch(self, stack: list[LoraLayer]) -> None:
        """Make ``stack`` the active one (an empty stack: every adapter off, the base model)."""
        wanted = stack_fingerprint(stack)
        if wanted == self.fingerprint:
            return
        self.fingerprint = ""  # unknown until the switch completes
        if not stack:
            if self.loaded:
                self.pipeline.disable_lora()
            self.active, self.fingerprint = [], wanted
            return
        for layer in stack:
            if layer.adapter_name in self.loaded:
                self.loaded.move_to_end(layer.adapter_name)
            else:
                self._load(layer)
        self._evict(keep={layer.adapter_name for layer in stack})
        self.pipeline.enable_lora()
        self.pipeline.set_adapters([x.adapter_name for x in stack], adapter_weights=[x.weight for x in stack])
        self.active, self.fingerprint = list(stack), wanted

    def recorded(self) -> list[dict[str, Any]]:
        return [layer.recorded() for layer in self.active]

    def _load(self, layer: LoraLayer) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        # Read into memory, never memory-mapped: a file replaced in place must not change an adapter
        # already loaded from it. The bytes loaded are the bytes the lineage digest names.
        try:
            data = layer.path.read_bytes()
        except OSError as exc:
            raise LoraUnavailable(f"LoRA {layer.ref!r}: cannot be read ({_first_line(exc)})") from None
        if hashlib.sha256(data).hexdigest() != layer.sha256:
            raise LoraFileChanged(f"LoRA {layer.ref!r}: the file changed while the job was starting")
        try:
            state_dict = load(data)
        except (SafetensorError, ValueError) as exc:
            raise LoraLoadFailed(f"LoRA {layer.ref!r}: not a readable .safetensors file ({_first_line(exc)})") from None
        del data
        name = layer.adapter_name
        try:
            with _text_encoder_adapters(self.pipeline), _peft_notices_off():
                self.pipeline.load_lora_weights(state_dict, adapter_name=name)
        except Exception as exc:
            self._forget(name)
            raise LoraLoadFailed(f"LoRA {layer.ref!r} does not fit this model: {_misfit(exc)}") from None
        if name not in _loaded_names(self.pipeline):
            raise LoraLoadFailed(f"LoRA {layer.ref!r}: none of its weights match a layer of this model")
        self.loaded[name] = str(layer.path)
        self.loads += 1

    def _evict(self, keep: set[str]) -> None:
        for name in [n for n in self.loaded if n not in keep][: max(0, len(self.loaded) - self.capacity)]:
            with _peft_notices_off():
                self.pipeline.delete_adapters([name])
            del self.loaded[name]

    def _forget(self, name: str) -> None:
        """Delete what a failed load left of adapter ``name`` (nothing when it got nowhere)."""
        if name in _loaded_names(self.pipeline):
            with _peft_notices_off():
                self.pipeline.delete_adapters([name])
        if self.active:  # a new adapter may have been made active by the load
            names = [x.adapter_name for x in self.active]
            self.pipeline.set_adapters(names, adapter_weights=[x.weight for x in self.active])
        elif self.loaded:
            self.pipeline.disable_lora()
        self.fingerprint = stack_fingerprint(self.active)


def _misfit(exc: BaseException) -> str:
    """Why a LoRA did not load, in one line: PEFT lists every weight of the wrong shape."""
    wrong = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("size mismatch for")]
    if not wrong:
        return _first_line(exc)
    first = wrong[0].removeprefix("size mismatch for ").replace(": copying a param with shape", ":")
    return (
        f"{len(wrong)} of its weights have other shapes than this model's layers (made for another model "
        f"family?); first: {first[:240]}"
    )


def _loaded_names(pipeline: Any) -> set[str]:
    return {name for names in pipeline.get_list_adapters().values() for name in names}


@contextlib.contextmanager
def _peft_notices_off() -> Iterator[None]:
    """PEFT warns on every second adapter of a model ("Already found a peft_config") and when an
    adapter that was active is deleted; both are how the stack works here, not news for the log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        yield


@contextlib.contextmanager
def _text_encoder_adapters(pipeline: Any) -> Iterator[None]:
    """While a LoRA loads: let diffusers inject text-encoder adapters with PEFT directly when the
    installed transformers refuses this PEFT version for its own ``load_adapter`` (transformers 5
    asks for peft >= 0.22). diffusers' key conversion and adapter config are kept; only the final
    step, which transformers does with ``inject_adapter_in_model`` + ``set_peft_model_state_dict``,
    is done here."""
    names = getattr(pipeline, "_lora_loadable_modules", ()) if _transformers_refuses_peft() else ()
    encoders = [e for n in names if n.startswith("text_encoder") and (e := getattr(pipeline, n, None)) is not None]
    for encoder in encoders:
        encoder.load_adapter = _peft_load_adapter(encoder)
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.__dict__.pop("load_adapter", None)


def _transformers_refuses_peft() -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return False
    return Version(version("peft")) < Version(MIN_PEFT_VERSION)


def _peft_load_adapter(encoder: Any) -> Any:
    def load_adapter(adapter_name: str, adapter_state_dict: dict, peft_config: Any, **_: Any) -> None:
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        inject_adapter_in_model(peft_config, encoder, adapter_name=adapter_name)
        result = set_peft_model_state_dict(encoder, adapter_state_dict, adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
        if unexpected:
            raise ValueError(f"text encoder weights that match no layer: {', '.join(unexpected[:3])}")
        if not getattr(encoder, "_hf_peft_config_loaded", False) or not hasattr(encoder, "peft_config"):
            encoder.peft_config = {}
        encoder.peft_config[adapter_name] = peft_config
        encoder._hf_peft_config_loaded = True

    return load_adapter


def adapters_of(loaded: Any, capacity: int) -> LoraAdapters:
    """The pinned model's :class:`LoraAdapters`, made on first use."""
    if loaded.loras is None:
        loaded.loras = LoraAdapters(loaded.pipeline, capacity)
    return loaded.loras


def setting_capacity(res: Any, default: int = 8) -> int:
    settings = getattr(res, "settings", None)
    return settings.worker.lora_cache_size if settings is not None else default
