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
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from farm.errors import InvalidKey, UserError
from farm.specs import MAX_SEED, NegativePrompt, Prompt
from storage.objects.keys import validate_part

CORE_FIELDS = ("id", "prompt", "negative_prompt", "seed")
MAX_SHOWN = 20
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


def _records(data: bytes, source: str) -> list[tuple[int, dict[str, Any]]]:
    text = data.decode("utf-8-sig")
    if source.lower().endswith(".csv"):
        records = []
        for line, raw in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            record: dict[str, Any] = {}
            for key, value in raw.items():
                if key is None or value in (None, ""):
                    continue
                if key in ("id", "prompt", "negative_prompt"):
                    record[key] = value
                else:
                    try:
                        record[key] = json.loads(value)
                    except json.JSONDecodeError:
                        record[key] = value
            records.append((line, record))
        return records
    records = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(source, [f"line {line}: not JSON ({exc.msg})"]) from None
        if not isinstance(record, dict):
            raise ManifestError(source, [f"line {line}: a row must be a JSON object"])
        records.append((line, record))
    return records


def _row(line: int, record: dict[str, Any], problems: list[str]) -> ManifestRow | None:
    where = f"line {line}"
    raw_id = record.get("id", f"row-{line:06d}")
    try:
        row_id = validate_part(str(raw_id), "id")
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
    overrides = dict(record.get("overrides") or {})
    overrides.update({k: v for k, v in record.items() if k not in (*CORE_FIELDS, "overrides")})
    return ManifestRow(row_id, line, seed, texts.get("prompt"), texts.get("negative_prompt"), overrides)


def read_manifest(data: bytes, source: str) -> list[ManifestRow]:
    """Every row of a JSONL (default) or ``.csv`` manifest, checked; a :class:`ManifestError`
    lists every bad row."""
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
