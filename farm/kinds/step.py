"""What the post-step kinds share (``encode``, ``upscale``, ``contact_sheet``, ``package``):
:class:`StepSpec`, the items of a step, and :func:`step_kind`.

A *step* is a job of its own kind that works on the outputs of another job, its ``source_job``,
as they are when the step runs (a job spec's ``post_steps:`` become such jobs, submitted with
``after: [the job]``). As a rule it loads no diffusion model: its shards go to the ``farm.cpu``
queue (``farm worker --queues farm.cpu``), and it takes no ``model`` nor ``family``. A step whose
settings refine with a model (``upscale`` with ``method: img2img``: :meth:`StepSpec.runs_model`)
is given its source job's model and family at submit (:func:`farm.steps.resolve_step`) and runs
on that family's GPU queue with it. At submit (:mod:`farm.steps`) the source job must be one the submitter may
see, and the step's ``output_prefix`` becomes ``{source prefix}/{source job id}/steps``, so its
outputs lie beside the source's: ``{source prefix}/{source job id}/steps/{step job id}/...``.

A step has ``parts`` items (1 unless the kind shards its work, as ``upscale`` does), one per shard;
item ``p`` ends with a JSON record at its key listing what it read (key, sha256) and wrote.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from farm.families import CPU_FAMILY
from farm.job_spec import MAX_OUTPUT_PREFIX_CHARS, JobSpec, Prompt
from farm.kinds.base import ItemSource, JobKind, ShardRunner
from farm.spec_problems import literal_value, problem

# The render fields every JobSpec has and a step takes none of (a value other than the default is
# refused, naming the field; the stored spec, dumped with its defaults, parses again).
RENDER_FIELDS = (
    "model",
    "family",
    "prompts",
    "negative_prompt",
    "seeds",
    "base_seed",
    "count",
    "steps",
    "guidance",
    "width",
    "height",
    "scheduler",
    "patches",
)
# The source's prefix, its id and "steps" (and again for a step of a step), well below the key limit.
STEP_PREFIX_CHARS = 3 * MAX_OUTPUT_PREFIX_CHARS


class StepSpec(JobSpec):
    """The fields every step kind shares. Concrete steps subclass it with a ``kind`` literal."""

    families: ClassVar[tuple[str, ...]] = (CPU_FAMILY,)

    model: str = Field(default="", max_length=0, description="steps run no model")
    family: Literal["cpu"] = CPU_FAMILY
    prompts: list[Prompt] = Field(default_factory=list, max_length=0)
    source_job: uuid.UUID = Field(strict=False, description="the job whose outputs the step works on")
    shard_size: int = Field(default=1, ge=1, le=1, description="one part per shard")
    output_prefix: str = Field(
        default="renders",
        max_length=STEP_PREFIX_CHARS,
        description="set at submit: {source prefix}/{source job id}/steps",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_render_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            kind = literal_value(cls, "kind")
            for name in RENDER_FIELDS:
                if name not in data:
                    continue
                field = cls.model_fields[name]
                default = field.get_default(call_default_factory=True)
                value = data[name]
                if value != default and name not in cls.render_fields_taken(data):
                    usual = f"{kind} steps render nothing and take no '{name}'; remove it"
                    reason = cls.render_field_refused(name) or usual
                    raise problem((name,), reason, value)
        return data

    @classmethod
    def render_fields_taken(cls, data: dict[str, Any]) -> tuple[str, ...]:
        """The render fields (of :data:`RENDER_FIELDS`) this step's raw ``data`` may give: none,
        unless a kind's settings load a model (then ``model`` and ``family``)."""
        return ()

    @classmethod
    def render_field_refused(cls, name: str) -> str:
        """Why a render field is refused, when a kind says it its own way ("" for the usual reason)."""
        return ""

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:  # replaces JobSpec's: a step names no model
        return value

    @model_validator(mode="after")
    def _seed_form_and_size(self) -> StepSpec:  # replaces JobSpec's: a step has no seeds
        return self

    def item_axes(self) -> dict[str, int]:
        return {"parts": self.part_count()}

    def runs_model(self) -> bool:
        """A step loads no model (``farm.cpu``) unless a kind's settings say so."""
        return False

    def part_count(self) -> int:
        """How many shards the step's work is split into (1 unless the kind shards it)."""
        return 1

    def resolved_seeds(self) -> list[int]:
        return [0]


def step_items(spec: StepSpec) -> Iterator[ItemSource]:
    """One item per part: ``part`` rides in the item's extra axes (seed 0: a step draws no noise)."""
    for part in range(spec.part_count()):
        yield ItemSource(0, 0, (("part", part),))


def step_kind(spec: type[StepSpec], runner: Any) -> JobKind:
    """The descriptor of a step kind: a JSON record per item; no model and the ``farm.cpu`` queue
    unless its spec loads one (:meth:`StepSpec.runs_model`)."""
    return JobKind(spec=spec, items=step_items, runner=runner, ext="json", step=True)


__all__ = ["RENDER_FIELDS", "ShardRunner", "StepSpec", "step_items", "step_kind"]
