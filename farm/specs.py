"""Parsing job specs: a dict (decoded YAML/JSON, or the JSON a job row stores) into the kind it names.

:func:`parse_spec` validates through :func:`spec_adapter`, a ``TypeAdapter`` over the discriminated
union of the registered kinds (:mod:`farm.kinds`; a missing ``kind`` means ``text_to_image``), and
raises :class:`~farm.job_spec.SpecError` listing every problem as ``field.path[index]: reason``.
Specs round-trip through JSON (``parse_spec(spec.model_dump(mode="json")) == spec``): that JSON is
what the job row stores, and :func:`spec_fingerprint` hashes it. Reading spec files is
:mod:`farm.spec_files`; the fields every kind shares are :mod:`farm.job_spec`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from farm.job_spec import JobSpec, SpecError
from farm.kinds import DEFAULT_KIND, KINDS
from farm.spec_problems import problems_from

__all__ = [
    "LATER_FIELDS",
    "SET_FOR_POST_STEPS",
    "JobSpec",
    "SpecError",
    "parse_spec",
    "spec_adapter",
    "spec_fingerprint",
]

_adapter_cache: tuple[tuple[type[JobSpec], ...], TypeAdapter[Any]] | None = None


def _kind_of(value: Any) -> str | None:
    """The discriminator: a spec's ``kind`` (``text_to_image`` when absent)."""
    kind = value.get("kind", DEFAULT_KIND) if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) else None


def spec_adapter() -> TypeAdapter[Any]:
    """The ``TypeAdapter`` over the discriminated union (on ``kind``) of every registered kind."""
    global _adapter_cache
    models = tuple(kind.spec for kind in KINDS.values())
    if _adapter_cache is None or _adapter_cache[0] != models:
        members = tuple(Annotated[kind.spec, Tag(name)] for name, kind in KINDS.items())
        union = Annotated[Union[members], Discriminator(_kind_of)]  # noqa: UP007 (a runtime tuple)
        _adapter_cache = (models, TypeAdapter(union))
    return _adapter_cache[1]


def parse_spec(data: Any) -> JobSpec:
    """Validate a spec (a dict, as decoded from YAML/JSON or stored on the job row).

    Returns an instance of the registered kind named by ``kind``; raises :class:`SpecError`
    listing every problem found.
    """
    if not isinstance(data, dict):
        raise SpecError([("spec", f"must be a mapping of fields, not {type(data).__name__}")])
    try:
        spec = spec_adapter().validate_python(data)
    except ValidationError as exc:
        raise SpecError(problems_from(exc, {name: kind.spec for name, kind in KINDS.items()}, data)) from None
    if spec.post_steps:
        _check_post_steps(spec.post_steps)
    return spec


# What the farm sets on a post-step (the job it follows): a post-step entry may not give them.
SET_FOR_POST_STEPS = ("source_job", "after", "after_mode", "output_prefix", "idempotency_key")
_NO_JOB_YET = "00000000-0000-0000-0000-000000000000"  # the source while checking, before the job exists


def _check_post_steps(steps: list[dict[str, Any]]) -> None:
    """Each ``post_steps`` entry must be a step kind's spec without the fields the farm sets;
    every problem is named ``post_steps[i].field``."""
    step_kinds = sorted(name for name, kind in KINDS.items() if kind.step)
    problems: list[tuple[str, str]] = []
    for i, step in enumerate(steps):
        where = f"post_steps[{i}]"
        if step.get("kind") not in step_kinds:
            problems.append((f"{where}.kind", f"must be a step kind: {', '.join(step_kinds)}"))
            continue
        given = [name for name in SET_FOR_POST_STEPS if name in step]
        if given:
            problems.append((f"{where}.{given[0]}", "set by the farm for a post-step (the job it follows); remove it"))
            continue
        try:
            parse_spec({**step, "source_job": _NO_JOB_YET})
        except SpecError as exc:
            problems.extend((f"{where}.{path}", reason) for path, reason in exc.problems)
    if problems:
        raise SpecError(problems)


# Fields added after jobs were first stored: left out of the fingerprint while at their default, so a
# spec stored before they existed fingerprints as it did then (resubmitting it with its
# idempotency key after an upgrade is still "the same spec", not a conflict).
LATER_FIELDS = (
    *("name", "after", "after_policy", "after_mode", "webhook", "webhook_url", "only_items", "post_steps"),
    *("method", "strength", "refine_steps", "refine_guidance", "prompt", "seed"),  # upscale img2img
)


def spec_fingerprint(spec: JobSpec) -> str:
    """sha256 (hex) of the spec's canonical JSON: sorted keys, no whitespace, ASCII escapes;
    :data:`LATER_FIELDS` at their default left out."""
    data = spec.model_dump(mode="json")
    defaults = type(spec).model_fields
    for name in LATER_FIELDS:
        if name in data and name in defaults and data[name] == _default_json(defaults[name]):
            del data[name]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _default_json(field: Any) -> Any:
    default = field.get_default(call_default_factory=True)
    return default.value if hasattr(default, "value") else default
