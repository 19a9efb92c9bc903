"""ModelPatcher: reversible patches on a resident diffusers pipeline.

A :class:`Patch` describes a change; :meth:`ModelPatcher.apply` applies a list of them in order
and returns a :class:`PatchHandle` whose :meth:`~PatchHandle.remove` restores everything:

- **weight patches** (``ctx.multiply``, ``ctx.add``) change parameters in place under
  ``no_grad``. Each parameter is backed up once (to host memory, pinned when it lives on a GPU),
  the patches on it are computed in fp32 in the order given (ComfyUI's ``calculate_weight``:
  ``W <- f * W`` then ``W <- W + alpha * diff``), and the result is cast back to the parameter's
  dtype. Remove copies the backup back: bit-exact. A parameter whose patches are all neutral
  (factor 1, alpha 0) is not touched at all.
- **attention processors** (``ctx.replace_processor`` / ``ctx.replace_attention`` with ComfyUI
  block keys) are swapped on the ``Attention`` modules; a factory receives the processor in
  place, so patches on one layer chain in list order. Remove puts the originals back.
- **hooks** (``ctx.install``) for anything else; each returns its own undo.

Nothing is changed until every patch of the list has been collected, so a patch that raises
(:class:`~patching.errors.PatchError`) leaves the model untouched; a failure while committing
rolls back what was done. While a set is applied a UNet forward pre-hook keeps
:attr:`ModelPatcher.state` (timestep, sigma, step index, cond/uncond layout) current.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, ClassVar

from patching.blocks import attention_paths
from patching.errors import PatchError
from patching.state import StepState

Undo = Callable[[], None]


class Patch(ABC):
    """One reversible change. Subclasses are usually frozen dataclasses of their settings."""

    name: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """JSON-able settings identifying this patch (dataclass fields by default). A patch that
        holds tensors reports a digest of them instead."""
        if is_dataclass(self):
            return asdict(self)
        raise NotImplementedError(f"{type(self).__name__} must define params()")

    @abstractmethod
    def apply(self, ctx: PatchContext) -> None:
        """Record this patch's changes on ``ctx`` (nothing may be changed directly)."""


def fingerprint(patches: Iterable[Patch]) -> str:
    """sha256 (hex) of the ordered patch list: names and settings. Equal fingerprints mean the
    same model state; the empty list has a fingerprint too (the unpatched model)."""
    described = [{"patch": p.name, "params": p.params()} for p in patches]
    canonical = json.dumps(described, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class _WeightOp:
    kind: str  # "multiply" | "add"
    factor: float = 1.0
    diff: Any = None
    alpha: float = 1.0

    @property
    def neutral(self) -> bool:
        return (self.kind == "multiply" and self.factor == 1.0) or (self.kind == "add" and self.alpha == 0.0)


class PatchContext:
    """What a patch sees while it is collected: the components, the step state, and methods to
    record changes. Names are qualified by component: ``unet.down_blocks.0...to_out.0.weight``,
    ``text_encoder.text_model...q_proj.weight``."""

    def __init__(self, patcher: ModelPatcher) -> None:
        self.components = patcher.components
        self.state = patcher.state
        self._parameters: dict[str, Any] = {}
        self.weight_ops: dict[str, list[_WeightOp]] = {}
        self.processors: list[tuple[str, Callable[[Any], Any]]] = []
        self.installs: list[Callable[[], Undo]] = []
        self.current: str = ""  # the patch being collected, for error messages

    # -- lookups ----------------------------------------------------------------------------
    @property
    def unet(self) -> Any:
        return self.component("unet")

    def component(self, name: str) -> Any:
        module = self.components.get(name)
        if module is None:
            raise PatchError(f"{self.current}: this model has no {name} (it has {', '.join(self.components)})")
        return module

    def parameter_names(self, component: str) -> list[str]:
        """Qualified names of a component's parameters, in module order."""
        return [f"{component}.{n}" for n, _ in self.component(component).named_parameters()]

    def parameter(self, name: str) -> Any:
        if not self._parameters:
            for comp, module in self.components.items():
                for n, p in module.named_parameters():
                    self._parameters[f"{comp}.{n}"] = p
        try:
            return self._parameters[name]
        except KeyError:
            raise PatchError(f"{self.current}: no parameter {name!r} in this model") from None

    def module(self, path: str) -> Any:
        component, _, sub = path.partition(".")
        try:
            return self.component(component).get_submodule(sub) if sub else self.component(component)
        except AttributeError:
            raise PatchError(f"{self.current}: no module {path!r} in this model") from None

    # -- recording --------------------------------------------------------------------------
    def multiply(self, name: str, factor: float) -> None:
        """``W <- factor * W`` for the parameter ``name``."""
        self.parameter(name)
        self.weight_ops.setdefault(name, []).append(_WeightOp("multiply", factor=float(factor)))

    def add(self, name: str, diff: Any, alpha: float = 1.0) -> None:
        """``W <- W + alpha * diff`` (``diff`` a tensor of the parameter's shape)."""
        param = self.parameter(name)
        if tuple(diff.shape) != tuple(param.shape):
            raise PatchError(f"{self.current}: {name} has shape {tuple(param.shape)}, diff has {tuple(diff.shape)}")
        self.weight_ops.setdefault(name, []).append(_WeightOp("add", diff=diff, alpha=float(alpha)))

    def replace_processor(self, path: str, factory: Callable[[Any], Any]) -> None:
        """Swap the processor of the ``Attention`` module at ``path`` (component-qualified) for
        ``factory(processor_in_place)``."""
        module = self.module(path)
        if not hasattr(module, "set_processor"):
            raise PatchError(f"{self.current}: {path} is a {type(module).__name__}, not an attention module")
        self.processors.append((path, factory))

    def replace_attention(
        self, key: Iterable[Any], factory: Callable[[Any], Any], attn: str = "attn2", *, temporal: bool = False
    ) -> list[str]:
        """:meth:`replace_processor` on every UNet attention a ComfyUI block key addresses;
        returns the paths."""
        paths = [f"unet.{p}" for p in attention_paths(self.unet, key, attn, temporal=temporal)]
        for path in paths:
            self.replace_processor(path, factory)
        return paths

    def install(self, hook: Callable[[], Undo]) -> None:
        """Run ``hook()`` at commit; the callable it returns undoes it at remove."""
        self.installs.append(hook)


@dataclass
class PatchHandle:
    """An applied patch set. :meth:`remove` restores the model exactly; it is idempotent."""

    patcher: ModelPatcher
    fingerprint: str
    patches: tuple[Patch, ...]
    changed_parameters: list[str] = field(default_factory=list)
    replaced_processors: list[str] = field(default_factory=list)
    apply_seconds: float = 0.0
    _undo: list[Undo] = field(default_factory=list, repr=False)
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        started = time.perf_counter()
        errors: list[BaseException] = []
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as exc:  # keep restoring the rest
                errors.append(exc)
        _synchronize(self.patcher.components)
        self.removed = True
        if self.patcher.active is self:
            self.patcher.active = None
        self.patcher.last_remove_seconds = time.perf_counter() - started
        if errors:
            raise errors[0]


class ModelPatcher:
    """Applies and removes patch sets on one model (a diffusers pipeline, or a bare module that
    is then the ``unet``). One set is applied at a time; :meth:`ensure` swaps sets cheaply."""

    def __init__(self, model: Any, *, backup_device: str = "cpu") -> None:
        components = getattr(model, "components", None)
        if isinstance(components, dict):
            self.pipeline = model
            self.components = {k: v for k, v in components.items() if hasattr(v, "named_parameters")}
        else:
            self.pipeline = None
            self.components = {"unet": model}
        self.backup_device = backup_device
        self.state = StepState()
        self.state.pipeline_ref = lambda: self.pipeline  # hooks read the running pipeline's CFG
        self.active: PatchHandle | None = None
        self.applies = 0
        self.last_apply_seconds = 0.0
        self.last_remove_seconds = 0.0

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the applied set (that of the empty set when nothing is applied)."""
        return self.active.fingerprint if self.active is not None else fingerprint(())

    def ensure(self, patches: Sequence[Patch]) -> PatchHandle | None:
        """Make ``patches`` the applied set: nothing to do when it already is; otherwise remove
        the current set and apply this one (an empty list leaves the model unpatched)."""
        wanted = fingerprint(patches)
        if self.active is not None and self.active.fingerprint == wanted:
            return self.active
        if self.active is not None:
            self.active.remove()
        return self._apply(patches, wanted) if patches else None

    def apply(self, patches: Sequence[Patch]) -> PatchHandle:
        return self._apply(patches, fingerprint(patches))

    def _apply(self, patches: Sequence[Patch], set_fingerprint: str) -> PatchHandle:
        if self.active is not None:
            raise PatchError("a patch set is already applied; remove it first (or use ensure)")
        started = time.perf_counter()
        ctx = PatchContext(self)
        for patch in patches:
            if not isinstance(patch, Patch):
                raise PatchError(f"{patch!r} is not a Patch")
            ctx.current = patch.name
            patch.apply(ctx)
        handle = PatchHandle(self, set_fingerprint, tuple(patches))
        try:
            self._commit(ctx, handle)
        except BaseException:
            handle.remove()
            raise
        _synchronize(self.components)
        handle.apply_seconds = self.last_apply_seconds = time.perf_counter() - started
        self.active = handle
        self.applies += 1
        return handle

    def remove(self) -> None:
        if self.active is not None:
            self.active.remove()

    @contextlib.contextmanager
    def running(self, pipeline: Any) -> Iterator[None]:
        """Read the step state from ``pipeline`` while it runs: another pipeline built on the same
        components (e.g. a ControlNet pipeline made with ``from_pipe``)."""
        saved, self.pipeline = self.pipeline, pipeline
        try:
            yield
        finally:
            self.pipeline = saved

    # -- commit -----------------------------------------------------------------------------
    def _commit(self, ctx: PatchContext, handle: PatchHandle) -> None:
        import torch

        with torch.no_grad():
            for name, ops in ctx.weight_ops.items():
                if all(op.neutral for op in ops):
                    continue
                param = ctx.parameter(name)
                backup = _backup(param, self.backup_device)
                handle._undo.append(_restorer(param, backup))
                # fp32 parameters, and a lone multiply in any dtype (PyTorch computes it in fp32 and
                # rounds once), are updated in place; others go through an fp32 copy, rounded once.
                in_place = param.dtype == torch.float32 or (len(ops) == 1 and ops[0].kind == "multiply")
                work = param if in_place else param.detach().to(torch.float32, copy=True)
                for op in ops:
                    if op.kind == "multiply":
                        work.mul_(op.factor)
                    elif op.alpha != 0.0:
                        work.add_(op.diff.to(device=work.device, dtype=torch.float32), alpha=op.alpha)
                if not in_place:
                    param.copy_(work)
                handle.changed_parameters.append(name)
        for path, factory in ctx.processors:
            module = ctx.module(path)
            previous = module.processor
            module.set_processor(factory(previous))
            handle._undo.append(lambda module=module, previous=previous: module.set_processor(previous))
            handle.replaced_processors.append(path)
        for hook in ctx.installs:
            handle._undo.append(hook())
        unet = self.components.get("unet")
        if unet is not None and hasattr(unet, "register_forward_pre_hook"):
            state = self.state

            def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
                sample = args[0] if args else kwargs.get("sample")
                timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
                state.update(timestep, sample, state.pipeline_ref())

            state.reset()
            hook_handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
            handle._undo.append(hook_handle.remove)


def _backup(param: Any, device: str) -> Any:
    """A host copy of ``param`` (pinned when the parameter is on a GPU, so copies are async)."""
    import torch

    pin = param.is_cuda and device == "cpu"
    backup = torch.empty(param.shape, dtype=param.dtype, device=device, pin_memory=pin)
    backup.copy_(param.detach(), non_blocking=pin)
    return backup


def _restorer(param: Any, backup: Any) -> Undo:
    def restore() -> None:
        import torch

        with torch.no_grad():
            param.copy_(backup, non_blocking=backup.is_pinned())

    return restore


def _synchronize(components: dict[str, Any]) -> None:
    """Wait for async host<->GPU copies (pinned backups) before the model is used."""
    import torch

    first = (next(iter(m.parameters()), None) for m in components.values())
    if any(p is not None and p.is_cuda for p in first):
        torch.cuda.synchronize()
