"""Job specs: what a user submits, validated strictly before anything is written.

A spec is a frozen, strict pydantic model with limits on every field and ``extra="forbid"``.
:class:`JobSpec` holds the fields every job kind shares; each kind is a subclass with a
``kind: Literal[...]`` field, registered with :func:`register_job_kind`. :func:`parse_spec`
validates a dict through :func:`spec_adapter`, a ``TypeAdapter`` over the discriminated union
of the registered kinds (a missing ``kind`` means ``text_to_image``), and raises
:class:`SpecError` listing every problem as ``field.path[index]: reason``.

Patches (``patches: [{type: ..., ...}]``) are validated the same way: a patch type is a
:class:`PatchSpec` subclass with a ``type: Literal[...]`` field, registered with
:func:`register_patch_type`. Until one is registered every patch is refused.

Specs round-trip through JSON (``parse_spec(spec.model_dump(mode="json")) == spec``): that
JSON is what the job row stores, and :func:`spec_fingerprint` hashes it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    SerializeAsAny,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from farm.errors import InvalidKey, UserError
from farm.guidance import SelfAttentionGuidanceSpec
from farm.spec_problems import problems_from, utf8_error_at
from farm.spec_problems import shown as _shown
from storage.objects.keys import check_output_folder, validate_prefix

# -- limits --------------------------------------------------------------------------------------
MAX_MODEL_CHARS = 512
MAX_PATH_CHARS = 1024  # local file and folder paths in specs (adapters, encoders)
MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 2000
MAX_SEEDS = 10_000
MAX_SEED = 2**63 - 1
MAX_ITEMS = 100_000  # render items (prompts x seeds x ...) in one job
MAX_SHARD_SIZE = 256
MAX_PATCHES = 16
MAX_OUTPUT_PREFIX_CHARS = 256  # keeps every output key well under the key length limit
MAX_SPEC_FILE_BYTES = 1 << 20
MAX_SPEC_VALUES = 1 << 20  # values in a decoded spec file, YAML aliases expanded (no 1 MiB file has more)
MAX_SPEC_DEPTH = 32  # nesting of a decoded spec file (real specs are about 4 deep)
MAX_PROBLEMS_SHOWN = 20  # in a SpecError's message; ``problems`` keeps them all

DEFAULT_KIND = "text_to_image"
Family = Literal["sd15", "sdxl", "svd"]
FAMILIES: tuple[str, ...] = get_args(Family)

# Scheduler names a spec may use -> diffusers scheduler class names (no diffusers import here).
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
SchedulerName = Literal["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "unipc"]

IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~/")

# Modules that define further job kinds or patch types; imported (once) before the registries are
# used, so every process that parses specs knows every kind. Later issues append to this tuple.
EXTENSION_MODULES: tuple[str, ...] = ("farm.patch_specs", "farm.temporal_video", "farm.face_identity")


# -- errors --------------------------------------------------------------------------------------
class SpecError(UserError):
    """A job spec was refused. ``problems`` holds every ``(field path, reason)`` pair found."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        shown = [f"{path}: {reason}" for path, reason in self.problems[:MAX_PROBLEMS_SHOWN]]
        hidden = len(self.problems) - len(shown)
        if hidden > 0:
            shown.append(f"... and {hidden} more problem{'s' if hidden > 1 else ''}")
        super().__init__("invalid job spec: " + "; ".join(shown))


def _problem(loc: tuple[str | int, ...], reason: str, value: Any) -> ValidationError:
    """A validation error at ``loc`` (relative to where it is raised) that pydantic merges into
    the spec's errors with the full path. ``reason`` is shown as is (no template expansion)."""
    error = PydanticCustomError("spec_problem", "{reason}", {"reason": reason})
    return ValidationError.from_exception_data("JobSpec", [{"type": error, "loc": loc, "input": value}])


# -- patches -------------------------------------------------------------------------------------
class PatchSpec(BaseModel):
    """Base of every patch type. A patch type subclasses this with ``type: Literal["name"]`` and
    its own fields, and is registered with :func:`register_patch_type`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    type: str


PATCH_TYPES: dict[str, type[PatchSpec]] = {}


def _literal_value(model: type[BaseModel], field: str) -> str:
    """The single string of ``model``'s ``field: Literal["..."]`` annotation."""
    info = model.model_fields.get(field)
    values = get_args(info.annotation) if info is not None else ()
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{model.__name__}.{field} must be annotated Literal['<name>'] with one value")
    return values[0]


PatchT = TypeVar("PatchT", bound=type[PatchSpec])


def register_patch_type(model: PatchT) -> PatchT:
    """Accept ``model`` in ``patches`` under its ``type`` literal. Usable as a class decorator."""
    if not (isinstance(model, type) and issubclass(model, PatchSpec)):
        raise TypeError(f"{model!r} is not a PatchSpec subclass")
    name = _literal_value(model, "type")
    if PATCH_TYPES.get(name, model) is not model:
        raise TypeError(f"patch type {name!r} is already registered by {PATCH_TYPES[name].__name__}")
    PATCH_TYPES[name] = model
    return model


def known_patch_types() -> list[str]:
    load_extensions()
    return sorted(PATCH_TYPES)


def _validate_patch(value: Any) -> PatchSpec:
    """Dispatch one ``patches`` entry to its registered model by ``type``."""
    if isinstance(value, PatchSpec) and PATCH_TYPES.get(value.type) is type(value):
        return value
    if not isinstance(value, dict):
        raise _problem((), "a patch must be an object with a 'type' field", value)
    known = ", ".join(known_patch_types()) or "none"
    if "type" not in value:
        raise _problem(("type",), f"missing; known types: {known}", value)
    name = value["type"]
    model = PATCH_TYPES.get(name) if isinstance(name, str) else None
    if model is None:
        raise _problem(("type",), f"unknown patch type {_shown(name)}; known types: {known}", name)
    return model.model_validate(value)


Patch = Annotated[SerializeAsAny[PatchSpec], PlainValidator(_validate_patch)]


# -- job kinds -----------------------------------------------------------------------------------
def _clean_text(value: str) -> str:
    """Free text (prompts): no control characters but tab and newline (the spec is stored as
    JSON in Postgres, which refuses NUL; pydantic already refuses unpaired surrogates)."""
    for ch in value:
        if (ord(ch) < 32 and ch not in "\t\n\r") or ord(ch) == 127:
            raise _problem((), "must not contain control characters (tab and newline are fine)", value)
    return value


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_clean_text)]
NegativePrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_clean_text)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class JobSpec(BaseModel):
    """Fields every job kind shares. Concrete kinds subclass it (``kind: Literal[...]``, and
    ``families`` naming the model families they run on); :func:`parse_spec` returns one of them.

    Seeds come in exactly one of two forms: ``seeds`` (an explicit list) or ``base_seed`` +
    ``count`` (``base_seed, base_seed + 1, ...``); :meth:`resolved_seeds` gives the list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    families: ClassVar[tuple[str, ...]] = FAMILIES

    kind: str
    model: str = Field(
        min_length=1,
        max_length=MAX_MODEL_CHARS,
        description="hub id 'org/name' or a local diffusers folder (absolute, or starting with ./ ../ ~/)",
    )
    family: Family
    prompts: list[Prompt] = Field(min_length=1, max_length=MAX_PROMPTS)
    negative_prompt: NegativePrompt = ""
    seeds: list[Seed] | None = Field(default=None, min_length=1, max_length=MAX_SEEDS)
    base_seed: Seed | None = None
    count: int | None = Field(default=None, ge=1, le=MAX_SEEDS)
    steps: int = Field(default=30, ge=1, le=150)
    guidance: float = Field(default=7.0, ge=0.0, le=30.0)
    width: int = Field(default=512, ge=64, le=2048)
    height: int = Field(default=512, ge=64, le=2048)
    scheduler: SchedulerName = "euler"
    shard_size: int = Field(default=4, ge=1, le=MAX_SHARD_SIZE, description="render items per shard")
    priority: int = Field(default=0, ge=0, le=9)
    output_prefix: str = Field(default="renders", max_length=MAX_OUTPUT_PREFIX_CHARS)
    idempotency_key: str | None = None
    patches: list[Patch] = Field(default_factory=list, max_length=MAX_PATCHES)

    @model_validator(mode="before")
    @classmethod
    def _concrete_only(cls, data: Any) -> Any:
        if cls is JobSpec:
            raise TypeError("JobSpec is the common base of the job kinds; validate with parse_spec()")
        return data

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        if value != value.strip():
            raise _problem((), "must not start or end with whitespace", value)
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise _problem((), "must not contain control characters", value)
        if "://" in value:
            raise _problem((), "URLs are not supported; use a hub id 'org/name' or a local folder", value)
        if value.startswith(LOCAL_PATH_PREFIXES) or value in ("~", "."):
            return value
        if HUB_ID_RE.fullmatch(value) is None or ".." in value or "--" in value:
            raise _problem(
                (),
                "must be a hub id 'org/name' or a local folder path (absolute, or starting with ./ ../ ~/)",
                value,
            )
        return value

    @field_validator("family")
    @classmethod
    def _family_for_kind(cls, value: str) -> str:
        if value not in cls.families:
            kind = _literal_value(cls, "kind")
            raise _problem((), f"{kind} jobs run on {' or '.join(cls.families)} models, not {value}", value)
        return value

    @field_validator("prompts")
    @classmethod
    def _no_blank_prompts(cls, value: list[str]) -> list[str]:
        for i, prompt in enumerate(value):
            if not prompt.strip():
                raise _problem((i,), "must not be blank", prompt)
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            first: dict[int, int] = {}
            for i, seed in enumerate(value):
                if seed in first:
                    raise _problem((i,), f"duplicate of seeds[{first[seed]}] ({seed}); seeds must be unique", seed)
                first[seed] = i
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise _problem((), "must be a multiple of 8", value)
        return value

    @field_validator("output_prefix")
    @classmethod
    def _output_prefix(cls, value: str) -> str:
        try:
            return check_output_folder(validate_prefix(value, "output_prefix"))
        except InvalidKey as exc:
            raise _problem((), str(exc).removeprefix("output_prefix").lstrip(": "), value) from None

    @field_validator("idempotency_key")
    @classmethod
    def _idempotency_key(cls, value: str | None) -> str | None:
        if value is not None and IDEMPOTENCY_KEY_RE.fullmatch(value) is None:
            raise _problem((), "must be 1-128 characters of A-Z a-z 0-9 . _ : -", value)
        return value

    @model_validator(mode="after")
    def _seed_form_and_size(self) -> JobSpec:
        explicit = self.seeds is not None
        ranged = self.base_seed is not None or self.count is not None
        if explicit and ranged:
            raise _problem(("seeds",), "give either 'seeds' or 'base_seed' + 'count', not both", self.seeds)
        if not explicit and not ranged:
            raise _problem(("seeds",), "missing: give 'seeds' (a list) or 'base_seed' + 'count'", None)
        if self.base_seed is not None and self.count is None:
            raise _problem(("count",), "required with base_seed", None)
        if self.count is not None and self.base_seed is None:
            raise _problem(("base_seed",), "required with count", None)
        if self.base_seed is not None and self.count is not None and self.base_seed + self.count - 1 > MAX_SEED:
            raise _problem(("count",), f"base_seed + count - 1 exceeds the largest seed {MAX_SEED}", self.count)
        for i, patch in enumerate(self.patches):
            families = getattr(type(patch), "families", FAMILIES)
            if self.family not in families:
                reason = f"{patch.type} applies to {' or '.join(families)} models, not {self.family}"
                raise _problem(("patches", i, "type"), reason, patch.type)
        axes = self.item_axes()
        total = math.prod(axes.values())
        if total > MAX_ITEMS:
            product = " x ".join(f"{n} {name}" for name, n in axes.items())
            raise _problem((), f"{product} = {total} items; a job may have at most {MAX_ITEMS}", total)
        return self

    def resolved_seeds(self) -> list[int]:
        """The job's seeds in order: the ``seeds`` list, or ``base_seed .. base_seed + count - 1``."""
        if self.seeds is not None:
            return list(self.seeds)
        assert self.base_seed is not None and self.count is not None  # guaranteed by validation
        return list(range(self.base_seed, self.base_seed + self.count))

    def item_axes(self) -> dict[str, int]:
        """Size of each axis the job's render items span (their product is the item count).
        A kind with a further axis (reference frames, ...) extends this."""
        count = len(self.seeds) if self.seeds is not None else (self.count or 0)
        return {"prompts": len(self.prompts), "seeds": count}

    def item_count(self) -> int:
        return math.prod(self.item_axes().values())


JOB_KINDS: dict[str, type[JobSpec]] = {}
_adapter_cache: tuple[tuple[type[JobSpec], ...], TypeAdapter[Any]] | None = None

SpecT = TypeVar("SpecT", bound=type[JobSpec])


def register_job_kind(model: SpecT) -> SpecT:
    """Make ``model`` (a :class:`JobSpec` subclass with ``kind: Literal["name"]``) a job kind
    that :func:`parse_spec` accepts. Usable as a class decorator."""
    if not (isinstance(model, type) and issubclass(model, JobSpec)) or model is JobSpec:
        raise TypeError(f"{model!r} is not a JobSpec subclass")
    name = _literal_value(model, "kind")
    if JOB_KINDS.get(name, model) is not model:
        raise TypeError(f"job kind {name!r} is already registered by {JOB_KINDS[name].__name__}")
    JOB_KINDS[name] = model
    return model


@register_job_kind
class TextToImageSpec(JobSpec):
    """Plain text-to-image: every prompt with every seed, on an SD1.5 or SDXL model."""

    families: ClassVar[tuple[str, ...]] = ("sd15", "sdxl")

    kind: Literal["text_to_image"] = "text_to_image"
    sag: SelfAttentionGuidanceSpec | None = None


def known_job_kinds() -> list[str]:
    load_extensions()
    return sorted(JOB_KINDS)


def _kind_of(value: Any) -> str | None:
    """The discriminator: a spec's ``kind`` (``text_to_image`` when absent)."""
    kind = value.get("kind", DEFAULT_KIND) if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) else None


def spec_adapter() -> TypeAdapter[Any]:
    """The ``TypeAdapter`` over the discriminated union (on ``kind``) of every registered kind."""
    global _adapter_cache
    load_extensions()
    kinds = tuple(JOB_KINDS.values())
    if _adapter_cache is None or _adapter_cache[0] != kinds:
        members = tuple(Annotated[model, Tag(name)] for name, model in JOB_KINDS.items())
        union = Annotated[Union[members], Discriminator(_kind_of)]  # noqa: UP007 (a runtime tuple)
        _adapter_cache = (kinds, TypeAdapter(union))
    return _adapter_cache[1]


_extensions_loaded = False


def load_extensions() -> None:
    """Import :data:`EXTENSION_MODULES` once so their kinds and patch types are registered."""
    global _extensions_loaded
    if not _extensions_loaded:
        _extensions_loaded = True  # set first: an extension module may itself use the registries
        try:
            for name in EXTENSION_MODULES:
                importlib.import_module(name)
        except BaseException:
            _extensions_loaded = False
            raise


# -- parsing -------------------------------------------------------------------------------------
def parse_spec(data: Any) -> JobSpec:
    """Validate a spec (a dict, as decoded from YAML/JSON or stored on the job row).

    Returns an instance of the registered kind named by ``kind``; raises :class:`SpecError`
    listing every problem found.
    """
    if not isinstance(data, dict):
        raise SpecError([("spec", f"must be a mapping of fields, not {type(data).__name__}")])
    try:
        return spec_adapter().validate_python(data)
    except ValidationError as exc:
        raise SpecError(problems_from(exc, JOB_KINDS, data)) from None


def _yaml_loader() -> Any:
    """A ``yaml.SafeLoader`` subclass that refuses duplicate mapping keys."""
    import yaml

    class UniqueKeySafeLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<: *anchor' merges may be overridden by explicit keys
                    key = self.construct_object(key_node, deep=deep)
                    if not isinstance(key, Hashable):
                        continue  # the base class refuses unhashable keys
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {_shown(key)}", key_node.start_mark
                        )
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeySafeLoader


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_shown(key)}")
        out[key] = value
    return out


def load_spec_file(path: str | os.PathLike[str]) -> JobSpec:
    """A spec from a ``.yaml``/``.yml`` or ``.json`` file of at most 1 MiB (YAML is read with a
    safe loader; duplicate keys are refused). Raises :class:`SpecError`."""
    return parse_spec(read_spec_file(path))


def read_spec_file(path: str | os.PathLike[str]) -> Any:
    """The decoded data of a spec file, not yet validated (see :func:`load_spec_file`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise SpecError([("file", f"{path.name}: use a .yaml, .yml or .json file")])
    try:
        if not path.is_file():
            raise SpecError([("file", f"{path} does not exist or is not a file")])
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError([("file", f"cannot read {path}: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_SPEC_FILE_BYTES:
        raise SpecError([("file", f"{path.name} is larger than {MAX_SPEC_FILE_BYTES} bytes")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = utf8_error_at(raw, exc)
        raise SpecError([("file", f"{path.name} is not UTF-8 text (line {line}, column {column})")]) from None
    import yaml

    try:
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_object)
        else:
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        raise SpecError([("file", f"{path.name} is not valid {suffix[1:].upper()}: {_syntax_error(exc)}")]) from None
    _check_shape(data, path.name)
    return data


def _syntax_error(exc: BaseException) -> str:
    """What a YAML or JSON parser refused, with the line and column where it knows them
    (``mapping values are not allowed here (line 3, column 9)``)."""
    import yaml

    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or type(exc).__name__
        if exc.problem and exc.context:
            problem = f"{problem} {exc.context}"
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{problem}{where}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_shape(data: Any, name: str) -> None:
    """Refuse decoded data that is a trap rather than a spec: a YAML alias inside itself (a cycle),
    nesting deeper than :data:`MAX_SPEC_DEPTH`, or more than :data:`MAX_SPEC_VALUES` values once
    aliases are expanded (a "billion laughs" file is a few hundred bytes). Everything that walks a
    spec (input uploads, validation, the JSON stored on the job row) would otherwise loop, overflow
    the stack or expand it. Iterative, and each shared node is measured once."""
    sizes: dict[int, int] = {}  # id(container) -> values under it, aliases expanded
    open_: set[int] = set()  # containers on the current path (a repeat is a cycle)
    stack: list[tuple[Any, int, bool]] = [(data, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if not isinstance(node, dict | list):
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if done:
            open_.discard(id(node))
            total = 1 + sum(sizes.get(id(c), 1) if isinstance(c, dict | list) else 1 for c in children)
            if total > MAX_SPEC_VALUES:
                raise SpecError([("file", f"{name} expands to more than {MAX_SPEC_VALUES} values (YAML aliases?)")])
            sizes[id(node)] = total
            continue
        if id(node) in open_:
            raise SpecError([("file", f"{name} refers to itself (a YAML alias inside its own anchor)")])
        if id(node) in sizes:
            continue
        if depth > MAX_SPEC_DEPTH:
            raise SpecError([("file", f"{name} is nested more than {MAX_SPEC_DEPTH} levels deep")])
        open_.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children)


def spec_fingerprint(spec: JobSpec) -> str:
    """sha256 (hex) of the spec's canonical JSON: sorted keys, no whitespace, ASCII escapes."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
