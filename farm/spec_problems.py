"""Turning pydantic's validation errors of a job spec into ``(field path, reason)`` pairs a
person can act on: ``identity.references[1].key: ...``, never pydantic's internal union tags. An
unknown field names the closest known one (``guidence: unknown field; did you mean guidance?``)."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

TAG_FIELDS = ("kind", "method", "type")  # one-value Literal fields that pick a model of a union


def shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def problem(loc: tuple[str | int, ...], reason: str, value: Any) -> ValidationError:
    """A validation error at ``loc`` (relative to where a validator raises it) that pydantic merges
    into the spec's errors with the full path. ``reason`` is shown as is (no template expansion)."""
    error = PydanticCustomError("spec_problem", "{reason}", {"reason": reason})
    return ValidationError.from_exception_data("JobSpec", [{"type": error, "loc": loc, "input": value}])


def literal_value(model: type[BaseModel], field: str) -> str:
    """The single string of ``model``'s ``field: Literal["..."]`` annotation (a job kind's
    ``kind``, a patch type's ``type``)."""
    info = model.model_fields.get(field)
    values = get_args(info.annotation) if info is not None else ()
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{model.__name__}.{field} must be annotated Literal['<name>'] with one value")
    return values[0]


def utf8_error_at(raw: bytes, exc: UnicodeDecodeError) -> tuple[int, int]:
    """``(line, column)``, both 1-based, of the first byte of ``raw`` that is not UTF-8."""
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    column = len(raw[line_start : exc.start].decode("utf-8", "replace")) + 1
    return raw.count(b"\n", 0, exc.start) + 1, column


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


def problems_from(exc: ValidationError, job_kinds: dict[str, Any], data: Any = None) -> list[tuple[str, str]]:
    """``(field path, reason)`` for every error of a spec validation; the kind union's tag is
    left out of paths, and tagged-union errors say which tags exist. ``data`` (the validated
    input) lets an unknown field inside a union or a patch suggest the right model's fields."""
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
        reason = _reason(error)
        if error["type"] == "extra_forbidden" and loc and kind_model is not None:
            reason += _did_you_mean(loc[-1], _fields_at(kind_model, loc[:-1], data))
        loc = _drop_nested_tags(kind_model, loc)
        problems.append((_path(loc), reason))
    return problems


def _did_you_mean(name: Any, known: Sequence[str]) -> str:
    """``"; did you mean guidance?"`` for the known field closest to ``name``, or ``""``."""
    if not isinstance(name, str) or not known:
        return ""
    lowered = {field.lower(): field for field in known if field != name}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[match[0]]}?" if match else ""


def _fields_at(model: Any, loc: Sequence[Any], data: Any) -> list[str]:
    """The field names the mapping at ``loc`` (below ``model``) may have; ``[]`` when unknown.
    Walks annotations and ``data`` together, so a union member or a registered subclass (a patch
    type) is picked by its tag, whether pydantic put the tag in the path or not."""
    annotation: Any = model
    value = data if isinstance(data, dict) else None
    for part in loc:
        if isinstance(part, str) and part in _tags_of(annotation):  # a union's tag in the path
            annotation = _tags_of(annotation)[part]
            continue
        if isinstance(part, int):
            annotation = _element_type(annotation)
            value = value[part] if isinstance(value, list) and -len(value) <= part < len(value) else None
            continue
        current = _pick_model(annotation, value)
        if current is None or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        value = value.get(part) if isinstance(value, dict) else None
    current = _pick_model(annotation, value)
    return list(current.model_fields) if current is not None else []


def _unwrap(annotation: Any) -> list[Any]:
    """The members of an ``Annotated``/``Optional``/union annotation, flattened."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return [m for arg in get_args(annotation) for m in _unwrap(arg)]
    return [annotation]


def _element_type(annotation: Any) -> Any:
    """``X`` of ``list[X]`` (or ``tuple[X, ...]``) inside an optional annotation; else ``None``."""
    for member in _unwrap(annotation):
        if get_origin(member) in (list, tuple, Sequence) and get_args(member):
            return get_args(member)[0]
    return None


def _subclasses(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for sub in model.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def _pick_model(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The one model ``annotation`` stands for: its only model, or the member (or registered
    subclass) whose tag field equals ``value``'s."""
    members = [m for m in _unwrap(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(members) == 1 and not members[0].__subclasses__():
        return members[0]
    candidates = {c for m in members for c in _subclasses(m)}
    if isinstance(value, dict):
        for model in candidates:
            for name in TAG_FIELDS:
                info = model.model_fields.get(name)
                tags = get_args(info.annotation) if info is not None else ()
                if len(tags) == 1 and name in value and value[name] == tags[0]:
                    return model
    return members[0] if len(members) == 1 else None


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
