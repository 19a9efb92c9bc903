"""The dataset card: ``README.md`` of a package, from its manifest (schema, counts, models, dates,
how to load and verify it). Its YAML header points the Hugging Face Hub at the shards."""

from __future__ import annotations

from typing import Any

from farm.datasets.parquet_shards import COLUMNS

_LAYOUT = {
    "webdataset": (
        "*.tar",
        "WebDataset tar shards: per sample `{id}.png` (the image), `{id}.json` (its metadata, the fields "
        "below) and `{id}.txt` (the caption). A dot in a row id is written `%2E` in member names.",
    ),
    "parquet": ("*.parquet", "Parquet files: one row per sample with the columns below, the image's bytes included."),
    "files": (
        "*/*",
        "One folder per shard: per sample `{id}.png`, `{id}.json` (the fields below) and `{id}.txt` "
        "(the caption), and `SHA256SUMS` (`sha256sum -c SHA256SUMS` in the folder checks it).",
    ),
}

_LOADING = {
    "webdataset": (
        "```python\nimport webdataset as wds\n\n"
        'dataset = wds.WebDataset("{{00000..{last:05d}}}.tar", shardshuffle=False).decode("pil")\n'
        'for sample in dataset:\n    image, meta, caption = sample["png"], sample["json"], sample["txt"]\n```'
    ),
    "parquet": (
        '```python\nimport pyarrow.parquet as pq\ntable = pq.read_table(".")  # or one file\n\n'
        'from datasets import load_dataset\nds = load_dataset("parquet", data_files="*.parquet", split="train")\n'
        'ds[0]["image"]  # a PIL image\n```'
    ),
    "files": (
        '```python\nimport json, pathlib\n\nfor meta in pathlib.Path(".").glob("*/*.json"):\n'
        "    row = json.loads(meta.read_text())\n```"
    ),
}


_JSON_NOTE = {
    name: (
        "`{id}.json` has these fields but `image` and `caption` (the `.png` and `.txt` members); "
        "there `patches` and `params` are JSON objects, not text.",
        "",
    )
    for name in ("webdataset", "files")
}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def dataset_card(manifest: dict[str, Any]) -> str:
    """The card's Markdown for a package ``manifest`` (see :mod:`farm.datasets.package`)."""
    name, format, shards, rows = manifest["name"], manifest["format"], manifest["shards"], manifest["rows"]
    pattern, layout = _LAYOUT[format]
    models: dict[str, dict[str, Any]] = {}
    for shard in shards:
        for digest, model in shard["models"].items():
            entry = models.setdefault(digest, {"model": model["model"], "rows": 0})
            entry["rows"] += model["rows"]
    rendered = [s["first_rendered_at"] for s in shards] + [s["last_rendered_at"] for s in shards]
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        f'  data_files: "{pattern}"',
        "---",
        f"# {name}",
        "",
        f"Images rendered by the patchfarm bulk job `{name}`, packaged as **{format}**.",
        "",
        "| | |",
        "| --- | --- |",
        f"| rows in the bulk job | {rows['total']} |",
        f"| packaged | {rows['packaged']} in {len(shards)} shard(s), {_size(sum(s['bytes'] for s in shards))} |",
        f"| failed | {rows['failed']} (each listed with its reason in `manifest.json` and its shard's stats) |",
        f"| not rendered yet | {rows['pending']} |",
        f"| rendered | {min(rendered, default='-')} to {max(rendered, default='-')} |",
        f"| packaged | {manifest['created_at']} to {manifest['updated_at']} ({len(manifest.get('runs', []))} run(s)) |",
        "",
        "## Models",
        "",
        "| model | digest | rows |",
        "| --- | --- | --- |",
        *(f"| {m['model']} | `{digest}` | {m['rows']} |" for digest, m in sorted(models.items())),
        "",
        "## Layout",
        "",
        layout,
        "",
        "Each shard `NNNNN` has `NNNNN_stats.json` (successes, failures with reasons, bytes, models, "
        "render dates); `manifest.json` lists every shard with its sha256, size and row ids.",
        "",
        "## Schema",
        "",
        "| field | type | meaning |",
        "| --- | --- | --- |",
        *(f"| `{column}` | {kind} | {meaning} |" for column, kind, meaning in COLUMNS),
        "",
        *_JSON_NOTE.get(format, ()),
        "## Loading",
        "",
        _LOADING[format].format(last=max(len(shards) - 1, 0)),
        "",
        "## Verifying a download",
        "",
        "Each shard's sha256 is in `manifest.json` (`shards[].sha256`; for `files`, the sha256 of the "
        "folder's `SHA256SUMS`). Shards are only ever added: a listed shard never changes.",
        "",
    ]
    return "\n".join(lines)
