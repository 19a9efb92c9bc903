"""What a job kind is: :class:`JobKind`, the one descriptor the farm reads about a kind.

A kind's spec side (its :class:`~farm.job_spec.JobSpec` subclass, how its items are enumerated,
its output extension, whether bulk renders may use it) is importable without torch, by the client
and the scheduler. Its runner (the function a worker calls to render one claimed shard) lives in a
worker-side module that only the worker imports, through :attr:`JobKind.runner`: a function that
imports it, so a reader and a static tool follow a plain ``import`` statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from farm.errors import UserError
from farm.families import CPU_FAMILY, CPU_QUEUE, gpu_queue
from farm.job_spec import JobSpec
from farm.spec_problems import literal_value

if TYPE_CHECKING:
    from farm.worker.shard_run import ShardRun


@dataclass(frozen=True)
class ItemSource:
    """One render item as a kind's items generator yields it, before it gets an index and a key.
    ``extra`` holds further axes (a frame, a conditioning image) as ``(name, value)`` pairs."""

    prompt_index: int
    seed: int
    extra: tuple[tuple[str, int | str], ...] = ()


def item_name(index: int, seed: int) -> str:
    """The readable, unique-per-job file stem of an item: ``000012-s1234``."""
    return f"{index:06d}-s{seed}"


ItemsGenerator = Callable[[Any], Iterable[ItemSource]]
ShardRunner = Callable[["ShardRun"], int]  # renders the items of a claimed shard; returns items done


@dataclass(frozen=True)
class JobKind:
    """One job kind.

    ``spec``: its spec model (``kind: Literal["name"]`` names the kind). ``items``: enumerates the
    render items of a spec in job order. ``runner``: returns the worker-side shard runner (imports
    it on first call). ``ext``: the extension of an item's main output. ``bulk``: nightly bulk
    renders may use it (one output per manifest row). ``runtime_applies_patches``: the worker
    applies the job's patches before calling the runner; ``False`` when the runner builds patches
    of its own (an identity) and applies them together with the job's through ``ShardRun.apply_patches``.
    ``step``: a post-step kind (its spec a :class:`~farm.kinds.step.StepSpec`; a render spec's
    ``post_steps`` may name it).

    Whether a job loads a model, and so its queue, is decided per spec in one place,
    :meth:`JobSpec.runs_model <farm.job_spec.JobSpec.runs_model>`, read through :meth:`model_of`
    (the worker) and :meth:`queue_for` (sharding).
    """

    spec: type[JobSpec]
    items: ItemsGenerator
    runner: Callable[[], ShardRunner]
    ext: str = "png"
    bulk: bool = False
    runtime_applies_patches: bool = True
    step: bool = False

    @property
    def name(self) -> str:
        return literal_value(self.spec, "kind")

    def model_of(self, spec: JobSpec) -> tuple[str, str] | None:
        """``(model, family)`` the worker loads (from its ``ModelCache``) and applies the job's
        patches to before the runner; ``None`` for a spec that loads no model (a post-step on
        ``farm.cpu``), whose runner gets ``ShardRun.loaded = None``."""
        return (spec.model, spec.family) if spec.runs_model() else None

    def queue_for(self, spec: JobSpec) -> str:
        """The queue of the spec's shards: the GPU queue of its family when it loads a model
        (``farm.gpu.{family}``), else ``farm.cpu``."""
        if not spec.runs_model():
            return CPU_QUEUE
        if spec.family == CPU_FAMILY:  # a step that loads a model gets its family at submit
            reason = f"a {spec.kind} job that loads a model has no family yet: submit it (farm.steps.resolve_step)"
            raise UserError(reason)
        return gpu_queue(spec.family)

    def __post_init__(self) -> None:
        if not (isinstance(self.spec, type) and issubclass(self.spec, JobSpec)) or self.spec is JobSpec:
            raise TypeError(f"{self.spec!r} is not a JobSpec subclass")
        self.name  # noqa: B018 (refuses a spec without a one-value kind literal)
