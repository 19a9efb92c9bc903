"""Parquet shards: one row per sample with the image's bytes and the same fields as the
WebDataset ``{id}.json`` (nested ``patches`` and ``params`` as JSON text), written in row groups
of :data:`ROW_GROUP` samples, so memory holds one group at most.

The ``image`` column is a struct of ``bytes`` and ``path`` and the file's schema metadata names
it an ``Image`` feature, so ``datasets.load_dataset("parquet", ...)`` gives decoded images.
pyarrow is needed (the ``datasets`` extra); without it the error says how to install it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from farm.datasets.rows import Sample
from farm.errors import UserError

ROW_GROUP = 256

# (column, arrow type name, what it holds): the schema, also shown in the dataset card.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("row_id", "string", "the manifest row's id"),
    ("image", "struct<bytes: binary, path: string>", "the image file's bytes (PNG) and its name"),
    ("caption", "string", "the prompt, as a caption"),
    ("prompt", "string", "the prompt"),
    ("negative_prompt", "string", "the negative prompt"),
    ("seed", "int64", "the seed"),
    ("model", "string", "the model as the spec named it"),
    ("model_hash", "string", "the model's digest"),
    ("steps", "int64", "denoising steps"),
    ("guidance", "double", "guidance scale"),
    ("width", "int64", "width in pixels"),
    ("height", "int64", "height in pixels"),
    ("scheduler", "string", "the scheduler"),
    ("patches", "string", "the patches applied (JSON)"),
    ("sha256", "string", "the image's sha256"),
    ("size_bytes", "int64", "the image's size in bytes"),
    ("key", "string", "the image's key in the farm's store"),
    ("rendered_at", "string", "when it was rendered (ISO 8601, UTC)"),
    ("params", "string", "every recorded parameter (JSON): patches, identity and guidance settings"),
)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError("--format parquet needs pyarrow; install it with: pip install 'patchfarm[datasets]'") from None
    return pyarrow


def _schema(pa: Any) -> Any:
    types = {
        "string": pa.string(),
        "int64": pa.int64(),
        "double": pa.float64(),
        "struct<bytes: binary, path: string>": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    }
    features = {
        name: {"_type": "Image"} if name == "image" else {"_type": "Value", "dtype": _hf_dtype(kind)}
        for name, kind, _ in COLUMNS
    }
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([(name, types[kind]) for name, kind, _ in COLUMNS], metadata=metadata)


def _hf_dtype(kind: str) -> str:
    return {"double": "float64"}.get(kind, kind)


def _record(sample: Sample) -> dict[str, Any]:
    meta = sample.row.metadata()
    record = {name: meta.get(name) for name, _, _ in COLUMNS}
    record["image"] = {"bytes": sample.image, "path": f"{sample.name}.{sample.ext}"}
    record["caption"] = sample.caption
    record["patches"] = json.dumps(meta["patches"], sort_keys=True)
    record["params"] = json.dumps(meta["params"], sort_keys=True)
    return record


def write_parquet(path: Path, samples: Iterable[Sample]) -> int:
    """Write the samples to a Parquet file at ``path``; returns how many."""
    pa = _pyarrow()
    schema = _schema(pa)
    count = 0
    batch: list[dict[str, Any]] = []
    with pa.parquet.ParquetWriter(path, schema, compression="zstd") as writer:
        for sample in samples:
            batch.append(_record(sample))
            count += 1
            if len(batch) == ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return count


def check_available() -> None:
    """Raise the install hint now, before anything is written, when pyarrow is missing."""
    _pyarrow()
