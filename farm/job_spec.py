"""The fields every job kind shares: :class:`JobSpec`, its field types and limits, and :class:`SpecError`.

A job kind subclasses :class:`JobSpec` with a ``kind: Literal["name"]`` field and ``families``
(see :mod:`farm.kinds`); :func:`farm.specs.parse_spec` validates a dict into the kind it names.
Every spec is a frozen, strict pydantic model with limits on every field and ``extra="forbid"``.
Seeds come in exactly one of two forms: ``seeds`` (an explicit list) or ``base_seed`` + ``count``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from farm.errors import InvalidKey, UserError
from farm.families import FAMILIES, Family
from farm.model_refs import RegistryError, is_registry_ref, parse_registry_ref
from farm.patch_specs import Patch
from farm.spec_problems import literal_value, problem
from farm.webhook_urls import check_webhook_url
from storage.objects.keys import check_output_folder, validate_prefix
from storage.webhook_outbox import EVENT_TYPES  # the outbox's names: WebhookEventName's

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
MAX_AFTER = 16  # upstream jobs one job may wait for
MAX_POST_STEPS = 8  # post-steps one job may list
MAX_JOB_NAME_CHARS = 64
MAX_PROBLEMS_SHOWN = 20  # in a SpecError's message; ``problems`` keeps them all


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
JOB_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_JOB_NAME_CHARS - 1}}}")
UUID_FORM_RE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~/")


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


# -- the shared fields ---------------------------------------------------------------------------
WebhookEventName = Literal["job.started", "job.progress", "job.succeeded", "job.partial", "job.failed", "job.cancelled"]


def _webhook_url(value: str) -> str:
    try:
        check_webhook_url(value)
    except ValueError as exc:
        raise problem((), str(exc), value) from None
    return value


WebhookUrl = Annotated[str, AfterValidator(_webhook_url)]


class WebhookSpec(BaseModel):
    """Where a job's events go (``url``) and which (``events``; default every one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: WebhookUrl
    events: list[WebhookEventName] | None = Field(default=None, min_length=1, max_length=len(EVENT_TYPES))

    @field_validator("events")
    @classmethod
    def _unique_events(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise problem((), "lists an event twice", value)
        return value


def _clean_text(value: str) -> str:
    """Free text (prompts): no control characters but tab and newline (the spec is stored as
    JSON in Postgres, which refuses NUL; pydantic already refuses unpaired surrogates)."""
    for ch in value:
        if (ord(ch) < 32 and ch not in "\t\n\r") or ord(ch) == 127:
            raise problem((), "must not contain control characters (tab and newline are fine)", value)
    return value


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_clean_text)]
NegativePrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_clean_text)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ItemIndex = Annotated[int, Field(ge=0, lt=MAX_ITEMS)]


def _job_name(value: str) -> str:
    if JOB_NAME_RE.fullmatch(value) is None:
        raise problem(
            (),
            f"must be 1-{MAX_JOB_NAME_CHARS} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
            value,
        )
    if UUID_FORM_RE.fullmatch(value):
        raise problem((), "must not have the form of a job id (after: would read it as one)", value)
    return value


def _job_ref(value: str) -> str:
    if not value or len(value) > MAX_JOB_NAME_CHARS or any(ord(ch) <= 32 or ord(ch) == 127 for ch in value):
        raise problem(
            (), f"must be a job id, an id prefix or a job name (1-{MAX_JOB_NAME_CHARS} characters, no spaces)", value
        )
    return value


JobName = Annotated[str, AfterValidator(_job_name)]
JobRef = Annotated[str, AfterValidator(_job_ref)]


def check_model_ref(value: str) -> str:
    """A spec's ``model``: a ``registry:`` reference, a hub id ``org/name`` or a local folder path;
    a :func:`~farm.spec_problems.problem` otherwise."""
    if value != value.strip():
        raise problem((), "must not start or end with whitespace", value)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise problem((), "must not contain control characters", value)
    if "://" in value:
        raise problem((), "URLs are not supported; use a hub id 'org/name' or a local folder", value)
    if value.startswith(LOCAL_PATH_PREFIXES) or value in ("~", "."):
        return value
    if is_registry_ref(value):
        try:
            parse_registry_ref(value)
        except RegistryError as exc:
            raise problem((), str(exc), value) from None
        return value
    if HUB_ID_RE.fullmatch(value) is None or ".." in value or "--" in value:
        raise problem(
            (),
            "must be a hub id 'org/name' or a local folder path (absolute, or starting with ./ ../ ~/), "
            "or registry:NAME[@VERSION]",
            value,
        )
    return value


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
        description="registry:NAME[@VERSION|@sha256:DIGEST] (pinned to one manifest at submit), a hub id "
        "'org/name' or a local diffusers folder (absolute, or starting with ./ ../ ~/)",
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
    webhook: WebhookSpec | None = Field(default=None, description="{url, events?}: where the job's events go.")
    webhook_url: WebhookUrl | None = Field(default=None, description="Short for webhook: {url: ...}.")
    only_items: list[ItemIndex] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ITEMS,
        description="render only these items (their indexes in the full job, ascending; `farm rerun "
        "--only-failed` sets it), each with its own seed and index as in the full job",
    )
    name: JobName | None = Field(
        default=None, description="a name for the job; another job's `after:` may use it (your latest job of that name)"
    )
    after: list[JobRef] = Field(
        default_factory=list,
        max_length=MAX_AFTER,
        description="jobs to start after: ids, id prefixes or names of your jobs, resolved at submit",
    )
    after_policy: Literal["wait", "run_anyway", "cancel"] = Field(
        default="wait",
        description="when an upstream ends partial, failed or cancelled: wait (for `farm retry` of it), "
        "run_anyway, or cancel this job",
    )
    after_mode: Literal["job", "shard"] = Field(
        default="job",
        description="job: start when the upstream jobs are done; shard: shard i starts when shard i of the "
        "one upstream succeeded",
    )
    post_steps: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=MAX_POST_STEPS,
        description="steps that run on this job's outputs once it succeeds, each a job of its own: "
        "{kind: encode|upscale|contact_sheet|package, ...its fields} (checked by farm.specs.parse_spec)",
    )

    @model_validator(mode="before")
    @classmethod
    def _concrete_only(cls, data: Any) -> Any:
        if cls is JobSpec:
            raise TypeError("JobSpec is the common base of the job kinds; validate with parse_spec()")
        return data

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        return check_model_ref(value)

    @field_validator("family")
    @classmethod
    def _family_for_kind(cls, value: str) -> str:
        if value not in cls.families:
            kind = literal_value(cls, "kind")
            raise problem((), f"{kind} jobs run on {' or '.join(cls.families)} models, not {value}", value)
        return value

    @field_validator("prompts")
    @classmethod
    def _no_blank_prompts(cls, value: list[str]) -> list[str]:
        for i, prompt in enumerate(value):
            if not prompt.strip():
                raise problem((i,), "must not be blank", prompt)
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            first: dict[int, int] = {}
            for i, seed in enumerate(value):
                if seed in first:
                    raise problem((i,), f"duplicate of seeds[{first[seed]}] ({seed}); seeds must be unique", seed)
                first[seed] = i
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise problem((), "must be a multiple of 8", value)
        return value

    @field_validator("output_prefix")
    @classmethod
    def _output_prefix(cls, value: str) -> str:
        try:
            return check_output_folder(validate_prefix(value, "output_prefix"))
        except InvalidKey as exc:
            raise problem((), str(exc).removeprefix("output_prefix").lstrip(": "), value) from None

    @field_validator("idempotency_key")
    @classmethod
    def _idempotency_key(cls, value: str | None) -> str | None:
        if value is not None and IDEMPOTENCY_KEY_RE.fullmatch(value) is None:
            raise problem((), "must be 1-128 characters of A-Z a-z 0-9 . _ : -", value)
        return value

    @model_validator(mode="after")
    def _seed_form_and_size(self) -> JobSpec:
        explicit = self.seeds is not None
        ranged = self.base_seed is not None or self.count is not None
        if explicit and ranged:
            raise problem(("seeds",), "give either 'seeds' or 'base_seed' + 'count', not both", self.seeds)
        if not explicit and not ranged:
            raise problem(("seeds",), "missing: give 'seeds' (a list) or 'base_seed' + 'count'", None)
        if self.base_seed is not None and self.count is None:
            raise problem(("count",), "required with base_seed", None)
        if self.count is not None and self.base_seed is None:
            raise problem(("base_seed",), "required with count", None)
        first: dict[str, int] = {}
        for i, ref in enumerate(self.after):
            if ref.lower() in first:
                raise problem(("after", i), f"duplicate of after[{first[ref.lower()]}]", ref)
            first[ref.lower()] = i
        if self.after_mode == "shard" and len(self.after) != 1:
            reason = f"shard mode takes exactly one job in after, not {len(self.after)}"
            raise problem(("after_mode",), reason, self.after_mode)
        if self.base_seed is not None and self.count is not None and self.base_seed + self.count - 1 > MAX_SEED:
            raise problem(("count",), f"base_seed + count - 1 exceeds the largest seed {MAX_SEED}", self.count)
        if self.webhook is not None and self.webhook_url is not None:
            raise problem(("webhook_url",), "give either webhook or webhook_url, not both", self.webhook_url)
        for i, patch in enumerate(self.patches):
            families = getattr(type(patch), "families", FAMILIES)
            if self.family not in families:
                reason = f"{patch.type} applies to {' or '.join(families)} models, not {self.family}"
                raise problem(("patches", i, "type"), reason, patch.type)
        axes = self.item_axes()
        total = math.prod(axes.values())
        if total > MAX_ITEMS:
            product = " x ".join(f"{n} {name}" for name, n in axes.items())
            raise problem((), f"{product} = {total} items; a job may have at most {MAX_ITEMS}", total)
        self._check_only_items(total)
        return self

    def _check_only_items(self, total: int) -> None:
        """``only_items``: strictly ascending indexes of items the full job has (``0 .. total - 1``)."""
        for i, index in enumerate(self.only_items or ()):
            if index >= total:
                raise problem(("only_items", i), f"the job has {total} items (0 to {total - 1})", index)
            if i and index <= self.only_items[i - 1]:
                raise problem(("only_items", i), "item indexes must be unique and in ascending order", index)

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
        """The items this job renders: ``only_items`` when given, else every item of its axes."""
        if self.only_items is not None:
            return len(self.only_items)
        return math.prod(self.item_axes().values())

    def runs_model(self) -> bool:
        """Whether a worker loads this spec's ``model`` (of its ``family``, on that family's GPU
        queue) for its shards. A render kind always does; a post-step does not (``farm.cpu``),
        unless its settings refine with a model (``upscale`` with ``method: img2img``).
        :meth:`farm.kinds.base.JobKind.queue_for` and :meth:`~farm.kinds.base.JobKind.model_of`
        read it."""
        return True

    def webhook_target(self) -> WebhookSpec | None:
        """The spec's webhook, in either form."""
        if self.webhook_url is not None:
            return WebhookSpec(url=self.webhook_url)
        return self.webhook


def local_path(value: str, suffixes: tuple[str, ...] = ()) -> str:
    """Validate a path on the workers' disks (adapters, encoders): absolute or ``./ ../ ~/``,
    no control characters, and one of ``suffixes`` when given."""
    if not value.startswith(LOCAL_PATH_PREFIXES):
        raise problem((), "must be a local path on the workers (absolute, or starting with ./ ../ ~/)", value)
    if any(ord(ch) < 32 for ch in value):
        raise problem((), "must not contain control characters", value)
    if suffixes and not value.endswith(suffixes):
        raise problem((), f"must be a {' or '.join(suffixes)} file", value)
    return value
