"""The ``text_to_image`` job kind: every prompt with every seed, on an SD1.5 or SDXL model.

Items are **prompt-major**: prompt 0 with every seed (in ``resolved_seeds()`` order), then prompt
1, ... so a shard mostly renders one prompt and a prompt's images sit together in the outputs.
The runner is :mod:`farm.worker.kinds.text_to_image`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

from pydantic import Field

from farm.guidance import SelfAttentionGuidanceSpec
from farm.job_spec import JobSpec
from farm.kinds.base import ItemSource, JobKind, ShardRunner
from farm.loras import LoraStack


class TextToImageSpec(JobSpec):
    """Plain text-to-image: every prompt with every seed, on an SD1.5 or SDXL model."""

    families: ClassVar[tuple[str, ...]] = ("sd15", "sdxl")

    kind: Literal["text_to_image"] = "text_to_image"
    sag: SelfAttentionGuidanceSpec | None = None
    loras: LoraStack = Field(default_factory=list, description="LoRAs applied to the model, in order")


def prompt_major_items(spec: JobSpec) -> Iterator[ItemSource]:
    """Every prompt with every seed, prompt-major."""
    seeds = spec.resolved_seeds()
    for prompt_index in range(len(spec.prompts)):
        for seed in seeds:
            yield ItemSource(prompt_index, seed)


def runner() -> ShardRunner:
    from farm.worker.kinds.text_to_image import run_text_to_image_shard  # worker side

    return run_text_to_image_shard


KIND = JobKind(spec=TextToImageSpec, items=prompt_major_items, runner=runner, ext="png", bulk=True)
