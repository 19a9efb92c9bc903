"""LoRA stacks on image jobs: ``loras: [{model, weight}, ...]``, the spec side.

``text_to_image`` and ``face_identity`` jobs (sd15, sdxl) may list up to :data:`MAX_LORAS` LoRAs,
each a local ``.safetensors`` file (or a folder holding one) on the workers' disks, or a model
registry reference ``registry:NAME``, ``registry:NAME@VERSION`` or ``registry:NAME@sha256:<hex>``.
The submit checks only the syntax, as it does for ``model``: workers load the files
(:mod:`farm.worker.lora_stack`), so a missing or corrupt file fails the job's shards with its
reason. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from farm.job_spec import LOCAL_PATH_PREFIXES, MAX_PATH_CHARS, local_path
from farm.model_refs import RegistryError, is_registry_ref, parse_registry_ref
from farm.spec_problems import problem

MAX_LORAS = 8
MIN_WEIGHT, MAX_WEIGHT = -10.0, 10.0
NOT_SAFETENSORS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_lora_ref(value: str) -> str:
    """A LoRA reference as a spec may give it: ``registry:NAME[@VERSION|@sha256:<64 hex>]`` or
    a local path (a ``.safetensors`` file or a folder holding one)."""
    if is_registry_ref(value):
        try:
            parse_registry_ref(value)  # the one parser of registry references (the model field's too)
        except RegistryError as exc:
            raise problem((), str(exc), value) from None
        return value
    if not value.startswith(LOCAL_PATH_PREFIXES):
        reason = "must be registry:NAME[@VERSION] or a local path on the workers (absolute, or starting with ./ ../ ~/)"
        raise problem((), reason, value)
    local_path(value)
    if value.lower().endswith(NOT_SAFETENSORS):
        raise problem((), "LoRA weights are read only from .safetensors files (no pickled checkpoints)", value)
    return value


class LoraSpec(BaseModel):
    """One LoRA of a job's stack and the weight it is applied at."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    model: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="a .safetensors file or a folder holding one on the workers, or registry:NAME[@VERSION]",
    )
    weight: float = Field(default=1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT, description="strength; 0 = off")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_lora_ref(value)


def _distinct(stack: list[LoraSpec]) -> list[LoraSpec]:
    first: dict[str, int] = {}
    for i, lora in enumerate(stack):
        if lora.model in first:
            reason = f"duplicate of loras[{first[lora.model]}].model; give each LoRA once with its total weight"
            raise problem((i, "model"), reason, lora.model)
        first[lora.model] = i
    return stack


LoraStack = Annotated[list[LoraSpec], Field(max_length=MAX_LORAS), AfterValidator(_distinct)]
