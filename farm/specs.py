"""Job specs: what a user submits, validated strictly before anything is written.

Specs are pydantic models with limits and ``extra="forbid"``. ``parse_spec`` turns a dict into a
spec or raises :class:`SpecError`, whose message lists every problem as ``field.path: reason``.
Specs round-trip through JSON (they are stored on the job row). Job kinds form a discriminated
union on ``kind``; patch types register into :data:`PATCH_TYPES` and are validated on ``type``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from farm.errors import InvalidKey, UserError
from storage.objects.keys import validate_prefix

MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 2000
MAX_SEEDS = 10_000
MAX_ITEMS = 100_000
MAX_SEED = 2**63 - 1
MAX_SPEC_FILE_BYTES = 1 << 20
SCHEDULER_NAMES = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "lms", "heun", "unipc")
Family = Literal["sd15", "sdxl", "svd"]

# Patch types: later modules register a pydantic model with a ``type: Literal[...]`` field here.
PATCH_TYPES: dict[str, type[BaseModel]] = {}


class SpecError(UserError):
    """A job spec was refused. ``problems`` holds ``(field path, reason)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("invalid job spec: " + "; ".join(f"{path}: {reason}" for path, reason in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


def register_patch_type(model: type[BaseModel]) -> type[BaseModel]:
    """Make a patch model acceptable in ``patches`` (keyed by its ``type`` literal)."""
    name = model.model_fields["type"].default
    PATCH_TYPES[name] = model
    return model


def _parse_patch(value: Any) -> BaseModel:
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError("a patch is an object with a 'type' field")
    model = PATCH_TYPES.get(value["type"])
    if model is None:
        known = ", ".join(sorted(PATCH_TYPES)) or "none"
        raise ValueError(f"unknown patch type {value['type']!r}; known types: {known}")
    return model.model_validate(value)


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class TextToImageSpec(_Strict):
    """Plain text-to-image: prompts x seeds on an SD1.5 or SDXL model."""

    kind: Literal["text_to_image"] = "text_to_image"
    model: str = Field(min_length=1, max_length=512, description="local diffusers folder or hub id org/name")
    family: Literal["sd15", "sdxl"]
    prompts: list[Prompt] = Field(min_length=1, max_length=MAX_PROMPTS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(default=None, max_length=MAX_SEEDS)
    base_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    count: int | None = Field(default=None, ge=1, le=MAX_SEEDS)
    steps: int = Field(default=30, ge=1, le=150)
    guidance: float = Field(default=7.0, ge=0.0, le=30.0)
    width: int = Field(default=512, ge=64, le=2048)
    height: int = Field(default=512, ge=64, le=2048)
    scheduler: Literal["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "lms", "heun", "unipc"] = "euler"
    shard_size: int = Field(default=4, ge=1, le=256)
    priority: int = Field(default=0, ge=0, le=9)
    output_prefix: str = Field(default="renders", max_length=256)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    patches: list[Any] = Field(default_factory=list, max_length=16)

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        if any(ord(ch) < 32 for ch in value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @field_validator("output_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        try:
            return validate_prefix(value, "output_prefix")
        except InvalidKey as exc:
            raise ValueError(str(exc)) from None

    @field_validator("patches", mode="before")
    @classmethod
    def _patches(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("must be a list of patches")
        return [_parse_patch(v) for v in value]

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("seeds must be unique")
        return value

    @model_validator(mode="after")
    def _seed_form_and_size(self) -> TextToImageSpec:
        explicit = self.seeds is not None
        ranged = self.base_seed is not None or self.count is not None
        if explicit == ranged:
            raise ValueError("give either seeds, or base_seed and count (exactly one form)")
        if ranged and (self.base_seed is None or self.count is None):
            raise ValueError("base_seed and count go together")
        if ranged and self.base_seed + self.count - 1 > MAX_SEED:
            raise ValueError(f"base_seed + count exceeds the largest seed {MAX_SEED}")
        items = len(self.prompts) * len(self.resolved_seeds())
        if items > MAX_ITEMS:
            raise ValueError(
                f"{len(self.prompts)} prompts x {len(self.resolved_seeds())} seeds = {items} items; "
                f"the limit is {MAX_ITEMS} per job"
            )
        return self

    def resolved_seeds(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        return list(range(self.base_seed, self.base_seed + self.count))


JobSpec = Annotated[TextToImageSpec, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TextToImageSpec)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"text_to_image"} or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "spec"


def parse_spec(data: Any) -> TextToImageSpec:
    """Validate a spec dict; raises :class:`SpecError` listing every problem with its field path."""
    if not isinstance(data, dict):
        raise SpecError([("spec", "must be a mapping of fields")])
    data = {"kind": "text_to_image", **data}
    if data["kind"] != "text_to_image":
        raise SpecError([("kind", f"unknown job kind {data['kind']!r}; known: text_to_image")])
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append((_path(err["loc"]), message))
        raise SpecError(problems) from None


def load_spec_file(path: Path) -> TextToImageSpec:
    """A spec from a ``.yaml``/``.yml`` or ``.json`` file (at most 1 MiB, safe YAML only)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([("file", f"{path} does not exist")])
    if path.stat().st_size > MAX_SPEC_FILE_BYTES:
        raise SpecError([("file", f"{path} is larger than {MAX_SPEC_FILE_BYTES} bytes")])
    suffix = path.suffix.lower()
    if suffix not in {".yaml", ".yml", ".json"}:
        raise SpecError([("file", f"{path.name}: use a .yaml, .yml or .json file")])
    text = path.read_text(encoding="utf-8")
    import yaml

    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError([("file", f"{path.name} is not valid {suffix[1:].upper()}: {first}")]) from None
    return parse_spec(data)


def spec_fingerprint(spec: BaseModel) -> str:
    """sha256 of the spec's canonical JSON (idempotency checks, manifests)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
