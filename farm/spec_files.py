"""Reading job spec files: ``.yaml``/``.yml`` or ``.json``, at most 1 MiB, safely.

YAML is read with a safe loader that refuses duplicate keys; a decoded file that is a trap rather
than a spec (a YAML alias inside itself, "billion laughs" expansion, absurd nesting) is refused
before anything walks it. Every refusal is a :class:`~farm.job_spec.SpecError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from farm.job_spec import JobSpec, SpecError
from farm.spec_problems import shown, utf8_error_at
from farm.specs import parse_spec

MAX_SPEC_FILE_BYTES = 1 << 20
MAX_SPEC_VALUES = 1 << 20  # values in a decoded spec file, YAML aliases expanded (no 1 MiB file has more)
MAX_SPEC_DEPTH = 32  # nesting of a decoded spec file (real specs are about 4 deep)


class UniqueKeySafeLoader(yaml.SafeLoader):
    """A ``yaml.SafeLoader`` that refuses duplicate mapping keys."""

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
                        None, None, f"duplicate key {shown(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {shown(key)}")
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
    try:
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_object)
        else:
            data = yaml.load(text, Loader=UniqueKeySafeLoader)  # noqa: S506 (a SafeLoader subclass)
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        raise SpecError([("file", f"{path.name} is not valid {suffix[1:].upper()}: {_syntax_error(exc)}")]) from None
    _check_shape(data, path.name)
    return data


def _syntax_error(exc: BaseException) -> str:
    """What a YAML or JSON parser refused, with the line and column where it knows them
    (``mapping values are not allowed here (line 3, column 9)``)."""
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
