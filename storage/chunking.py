"""Statements over many values, cut into pieces well below the drivers' bind-parameter limits.

libpq (psycopg) refuses a statement with more than 65,535 parameters and SQLite one with more
than 32,766, so a statement built from an unbounded list (``IN (...)`` of shard ids, the rows of
a 100,000-shard insert) must be cut: :func:`chunked` for ``IN`` lists, :func:`insert_rows` for
bulk inserts. Every piece runs in the caller's transaction.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from sqlalchemy import insert
from sqlalchemy.orm import Session

T = TypeVar("T")

DRIVER_MAX_PARAMS = 65_535  # libpq's limit; SQLite's is 32,766
MAX_PARAMS = 8_000  # the most bind parameters the farm puts in one statement
IN_CHUNK = 1_000  # values in one ``IN (...)`` list


def chunked(values: Iterable[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    """``values`` in lists of at most ``size`` (the last one shorter), read lazily."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}")
    it = iter(values)
    while batch := list(itertools.islice(it, size)):
        yield batch


def rows_per_statement(columns: int, max_params: int = MAX_PARAMS) -> int:
    """How many rows of ``columns`` values fit in one statement of at most ``max_params``."""
    return max(1, max_params // max(1, columns))


def insert_rows(session: Session, model: Any, rows: Iterable[dict[str, Any]], *, max_params: int = MAX_PARAMS) -> int:
    """Insert ``rows`` (dicts of column values) into ``model``'s table, as many statements as
    needed to keep each one under ``max_params`` parameters (every column of the table counts:
    defaults are sent too). ``rows`` is read lazily. Returns how many rows were inserted."""
    table = model.__table__
    per_statement = rows_per_statement(len(table.columns), max_params)
    total = 0
    for batch in chunked(rows, per_statement):
        session.execute(insert(model), batch)
        total += len(batch)
    return total
