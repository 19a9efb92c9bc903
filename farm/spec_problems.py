"""Turning pydantic's validation errors of a job spec into ``(field path, reason)`` pairs a
person can act on: ``identity.references[1].key: ...``, never pydantic's internal union tags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

from pydantic import ValidationError


def shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path(loc: Sequence[Any]) -> str:
    """``('prompts', 3)`` -> ``prompts[3]``; odd keys are quoted: ``["a b"]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{shown(part)}]"
    return out or "spec"


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "invalid_key":
        return "field names must be strings"
    return str(error["msg"]).removeprefix("Value error, ")


def problems_from(exc: ValidationError, job_kinds: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field path, reason)`` for every error of a spec validation; the kind union's tag is
    left out of paths, and tagged-union errors say which tags exist."""
    known = ", ".join(sorted(job_kinds))
    problems: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error["loc"])
        if loc and loc[0] in job_kinds:  # the union's tag: drop it from the path
            kind_model, loc = job_kinds[loc[0]], loc[1:]
        else:
            kind_model = None
        ctx = error.get("ctx") or {}
        if error["type"] == "union_tag_invalid" and not loc:
            problems.append(("kind", f"unknown job kind {shown(ctx.get('tag', ''))}; known kinds: {known}"))
            continue
        if error["type"] == "union_tag_not_found" and not loc:
            problems.append(("kind", f"must be a string naming a job kind; known kinds: {known}"))
            continue
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a nested tagged union
            field = str(ctx.get("discriminator", "")).strip("'") or "type"
            tags = str(ctx.get("expected_tags", "")).split(",")
            expected = ", ".join(sorted(t.strip().strip("'") for t in tags if t.strip()))
            if not expected:
                annotation = kind_model
                for part in loc:
                    annotation = _field_type(annotation, part)
                expected = ", ".join(sorted(_tags_of(annotation)))
            if error["type"] == "union_tag_invalid":
                reason = f"unknown {field} {shown(ctx.get('tag', ''))}; known: {expected}"
            else:
                reason = f"missing or not a string; known: {expected}" if expected else "missing"
            problems.append((_path((*loc, field)), reason))
            continue
        loc = _drop_nested_tags(kind_model, loc)
        problems.append((_path(loc), _reason(error)))
    return problems


def _drop_nested_tags(model: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic puts a tagged union's tag into the error path (``identity.ip_adapter.extra``);
    drop it when the field before it is a discriminated union of models."""
    out: list[Any] = []
    current: Any = model
    for part in loc:
        if current is not None and isinstance(part, str) and part in _tags_of(current):
            current = _tags_of(current)[part]
            continue
        out.append(part)
        current = _field_type(current, part)
    return tuple(out)


def _field_type(model: Any, part: Any) -> Any:
    fields = getattr(model, "model_fields", None)
    if not fields or not isinstance(part, str) or part not in fields:
        return None
    return fields[part].annotation


def _tags_of(annotation: Any) -> dict[str, Any]:
    """``{tag: model}`` of a union of models each with a one-value ``Literal`` discriminator."""
    tags: dict[str, Any] = {}
    for member in get_args(annotation) or ():
        for name, info in (getattr(member, "model_fields", None) or {}).items():
            values = get_args(info.annotation)
            if name in ("method", "type") and len(values) == 1 and isinstance(values[0], str):
                tags[values[0]] = member
    return tags
