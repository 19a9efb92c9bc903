"""Bulk manifests: rows of a dataset render, read from JSONL or CSV and checked before anything is
stored.

A row is ``id`` (stable: it names the output and links the dataset export; default ``row-<line>``),
``prompt`` and ``negative_prompt`` (default: the base spec's), ``seed`` (default: derived from the
id, so it never changes when rows are added), and any other field, which overrides the base spec
for that row (``family``, ``model``, ``steps``, ``identity``, ``sag``...; in CSV a cell is read as
JSON when it parses, and an ``overrides`` column may hold a JSON object). Rows with the same
overrides form one group: one normal job.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from farm.errors import InvalidKey, UserError
from farm.job_spec import MAX_SEED, NegativePrompt, Prompt
from farm.spec_files import MAX_SPEC_DEPTH
from farm.spec_problems import shown, utf8_error_at
from storage.objects.keys import MAX_PART_LENGTH, validate_part

CORE_FIELDS = ("id", "prompt", "negative_prompt", "seed")
MAX_SHOWN = 20
MAX_MANIFEST_BYTES = 256 << 20
MAX_MANIFEST_ROWS = 1_000_000
MAX_ROW_DEPTH = MAX_SPEC_DEPTH  # nesting of one row (its overrides become part of a job spec)
# A row's output is ``{id}.{ext}``, one key part of at most MAX_PART_LENGTH characters; ids leave
# room for the longest extension an image output has (".webp").
MAX_ROW_ID_CHARS = MAX_PART_LENGTH - len(".webp")
_prompt = TypeAdapter(Prompt)
_negative = TypeAdapter(NegativePrompt)


@dataclass(frozen=True)
class ManifestRow:
    row_id: str
    line: int
    seed: int
    prompt: str | None = None
    negative_prompt: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Rows with equal overrides render in one job."""
        return json.dumps(self.overrides, sort_keys=True, separators=(",", ":"))


class ManifestError(UserError):
    """The manifest has rows that cannot be rendered; every problem is listed (up to 20)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:MAX_SHOWN]
        more = f"; ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        super().__init__(f"manifest {source}: " + "; ".join(shown) + more)


def derived_seed(row_id: str) -> int:
    """The seed of a row without one: from its id, so adding rows never changes it."""
    return int(hashlib.sha256(row_id.encode()).hexdigest()[:15], 16)


def _decode(data: bytes, source: str) -> str:
    _decode_size(data, source)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = utf8_error_at(data, exc)
        raise ManifestError(
            source, [f"line {line}, column {column}: not UTF-8 text (save the file as UTF-8)"]
        ) from None


def _too_deep(value: Any, limit: int = MAX_ROW_DEPTH) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` levels deep (iterative)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _csv_records(text: str, source: str) -> list[tuple[int, dict[str, Any]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    while True:
        line = reader.line_num + 1  # where the next record starts (a quoted cell may span lines)
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                reason = (
                    f"a cell is longer than {csv.field_size_limit()} characters (128 KiB), the most a CSV cell may hold"
                )
            else:
                reason = f"not CSV ({exc})"
            raise ManifestError(source, [f"line {line}: {reason}"]) from None
        if header is None:
            header = cells
            continue
        if not cells:  # a blank line
            continue
        record: dict[str, Any] = {}
        for key, value in zip(header, cells, strict=False):
            if value == "":
                continue
            if key in ("id", "prompt", "negative_prompt"):
                record[key] = value
                continue
            try:
                record[key] = json.loads(value)
            except ValueError:  # not JSON (or a number too long to convert): the text itself
                record[key] = value
            except RecursionError:
                raise ManifestError(source, [f"line {line}: column {shown(key)}: nested too deeply to read"]) from None
            if _too_deep(record[key]):
                reason = f"column {shown(key)}: nested more than {MAX_ROW_DEPTH} levels deep"
                raise ManifestError(source, [f"line {line}: {reason}"])
        records.append((line, record))
        _check_count(records, source)
    return records


def _check_count(records: list[Any], source: str) -> None:
    if len(records) > MAX_MANIFEST_ROWS:
        raise ManifestError(source, [f"more than {MAX_MANIFEST_ROWS} rows; split the manifest"])


def _records(data: bytes, source: str) -> list[tuple[int, dict[str, Any]]]:
    text = _decode(data, source)
    if source.lower().endswith(".csv"):
        return _csv_records(text, source)
    records = []
    for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(source, [f"line {line}: not JSON ({exc.msg}, column {exc.colno})"]) from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ManifestError(source, [f"line {line}: not JSON ({str(exc).split(':')[0]})"]) from None
        except RecursionError:
            raise ManifestError(source, [f"line {line}: nested too deeply to read"]) from None
        if _too_deep(record):
            raise ManifestError(source, [f"line {line}: nested more than {MAX_ROW_DEPTH} levels deep"])
        if not isinstance(record, dict):
            raise ManifestError(source, [f"line {line}: a row must be a JSON object"])
        records.append((line, record))
        _check_count(records, source)
    return records


def _row(line: int, record: dict[str, Any], problems: list[str]) -> ManifestRow | None:
    where = f"line {line}"
    raw_id = str(record.get("id", f"row-{line:06d}"))
    if len(raw_id) > MAX_ROW_ID_CHARS:
        problems.append(
            f"{where}: id: {len(raw_id)} characters; an id may have at most {MAX_ROW_ID_CHARS} (its output file "
            f"name, the id and an extension, must fit in {MAX_PART_LENGTH})"
        )
        return None
    try:
        row_id = validate_part(raw_id, "id")
    except InvalidKey as exc:
        problems.append(f"{where}: {exc}")
        return None
    where = f"line {line} (id {row_id})"
    seed = record.get("seed", derived_seed(row_id))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        problems.append(f"{where}: seed must be an integer in 0..{MAX_SEED}")
        return None
    texts: dict[str, str | None] = {}
    for name, adapter in (("prompt", _prompt), ("negative_prompt", _negative)):
        value = record.get(name)
        if value is not None:
            try:
                texts[name] = adapter.validate_python(value)
            except ValidationError as exc:
                problems.append(f"{where}: {name}: {exc.errors()[0]['msg']}")
                return None
    extra = record.get("overrides") or {}
    if not isinstance(extra, dict):
        problems.append(f"{where}: overrides must be an object of spec fields, not {type(extra).__name__}")
        return None
    overrides = dict(extra)
    overrides.update({k: v for k, v in record.items() if k not in (*CORE_FIELDS, "overrides")})
    return ManifestRow(row_id, line, seed, texts.get("prompt"), texts.get("negative_prompt"), overrides)


def read_manifest_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a local manifest, refused (naming the file) when it is missing or larger than
    :data:`MAX_MANIFEST_BYTES`: a huge file is never read whole."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(str(path), [f"cannot read it: {exc.strerror or exc}"]) from None
    _decode_size(data, str(path))
    return data


def _decode_size(data: bytes, source: str) -> None:
    if len(data) > MAX_MANIFEST_BYTES:
        limit = f"{MAX_MANIFEST_BYTES >> 20} MiB" if MAX_MANIFEST_BYTES >= 1 << 20 else f"{MAX_MANIFEST_BYTES} bytes"
        raise ManifestError(source, [f"larger than {limit}, the most a manifest may have; split it"])


def read_manifest(data: bytes, source: str) -> list[ManifestRow]:
    """Every row of a JSONL (default) or ``.csv`` manifest, checked; a :class:`ManifestError`
    names the file and lists every bad row by line. Limits: :data:`MAX_MANIFEST_BYTES`,
    :data:`MAX_MANIFEST_ROWS`, rows nested at most :data:`MAX_ROW_DEPTH` levels, CSV cells of at
    most 128 KiB, ids of at most :data:`MAX_ROW_ID_CHARS` characters."""
    problems: list[str] = []
    rows: list[ManifestRow] = []
    first_line: dict[str, int] = {}
    for line, record in _records(data, source):
        row = _row(line, record, problems)
        if row is None:
            continue
        if row.row_id in first_line:
            problems.append(f"line {line}: id {row.row_id} repeats line {first_line[row.row_id]}")
            continue
        first_line[row.row_id] = line
        rows.append(row)
    if problems:
        raise ManifestError(source, problems)
    if not rows:
        raise ManifestError(source, ["no rows"])
    return rows
