"""``--set KEY=VALUE``: changes to a spec given on the command line (``farm rerun``, ``farm submit
--template``) or as a mapping in an API request.

A key is a dotted path into the spec: ``steps``, ``prompts.0`` (a list's element by its index),
``loras.1.weight``. A value is read as JSON when it parses (``30``, ``[1,2,3]``, ``null``,
``"7"``), else taken as the string it is (``a cat``). Changing one form of the seeds drops the
other (``seeds`` replaces ``base_seed`` + ``count`` and the other way round), so an override never
leaves both. The result is validated by the caller like any spec, so a bad value is refused
naming its field.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from farm.job_spec import SpecError

MAX_OVERRIDES = 64
MAX_PATH_CHARS = 200
MAX_DEPTH = 8
_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
SEED_FORMS = ({"seeds"}, {"base_seed", "count"})


def parse_sets(pairs: Iterable[str]) -> dict[str, Any]:
    """``["steps=30", "prompts.0=a cat"]`` -> ``{"steps": 30, "prompts.0": "a cat"}`` (values as
    JSON when they parse); a pair without ``=`` is refused naming it."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        path, sep, text = pair.partition("=")
        path = path.strip()
        if not sep or not path:
            raise SpecError([(path or pair[:40] or "--set", "give --set KEY=VALUE, e.g. --set steps=30")])
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        overrides[path] = value
    return overrides


def _parts(path: str) -> list[str]:
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
        raise SpecError([(str(path)[:40] or "--set", f"a key is a dotted path of at most {MAX_PATH_CHARS} characters")])
    parts = path.split(".")
    if len(parts) > MAX_DEPTH or any(_PART.fullmatch(part) is None for part in parts):
        raise SpecError([(path, "not a field path: names and list indexes joined by dots, e.g. prompts.0")])
    if parts[0].isdigit():
        raise SpecError([(path, "a path starts with a field name")])
    return parts


def apply_overrides(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with each ``path: value`` of ``overrides`` set (see the module doc)."""
    if len(overrides) > MAX_OVERRIDES:
        raise SpecError([("--set", f"at most {MAX_OVERRIDES} overrides")])
    result = copy.deepcopy(dict(spec))
    for path, value in overrides.items():
        _set(result, path, _parts(path), value)
    top = {_parts(path)[0] for path in overrides}
    for form, other in (SEED_FORMS, SEED_FORMS[::-1]):
        if top & form and not top & other:
            for name in other:
                result.pop(name, None)
    return result


def _set(target: Any, path: str, parts: list[str], value: Any) -> None:
    where: Any = target
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        so_far = ".".join(parts[: depth + 1])
        if isinstance(where, list):
            if not part.isdigit():
                raise SpecError([(so_far, f"{'.'.join(parts[:depth])} is a list: give an index")])
            index = int(part)
            if index > len(where) or (index == len(where) and not last):
                raise SpecError([(so_far, f"index out of range: the list has {len(where)} element(s)")])
            if index == len(where):
                where.append(value)  # one past the end appends
                return
            if last:
                where[index] = value
                return
            where = where[index]
        elif isinstance(where, dict):
            if part.isdigit():
                raise SpecError([(so_far, f"{'.'.join(parts[:depth])} is not a list")])
            if last:
                where[part] = value
                return
            if where.get(part) is None:
                where[part] = {}  # a mapping named for the first time (or unset): its fields follow
            where = where[part]
        else:
            raise SpecError([(so_far, f"{'.'.join(parts[:depth])} holds a single value, not fields")])
    raise AssertionError(path)  # the loop returns at the last part
