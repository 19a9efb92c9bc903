"""Running ``package`` shards: the source job's images as dataset files with the writers of
:mod:`farm.datasets` (WebDataset tar: ``{name}.png``, ``{name}.json``, ``{name}.txt`` per sample;
or Parquet), ``samples_per_file`` samples per file named ``00000.tar``, ``00001.tar``, ...

Each image is read from the store as the writer takes it (one in memory at a time) and checked
against its sha256; each file is written to a scratch folder, then stored.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from farm.datasets.formats import FORMATS
from farm.datasets.parquet_shards import check_available
from farm.datasets.rows import Sample, rendered_row
from farm.worker.shard_run import ShardRun
from farm.worker.step_inputs import SourceOutput, StepOutputs, lineage_params, read_input, source_images
from storage.objects.keys import artifact_key

if TYPE_CHECKING:
    from farm.kinds.package import PackageSpec


def _samples(run: ShardRun, images: list[SourceOutput], progress: float, step: float) -> Iterator[Sample]:
    for n, image in enumerate(images):
        yield Sample(rendered_row(image), read_input(run, image))
        run.progress(progress + step * (n + 1) / len(images))


def run_package_shard(run: ShardRun) -> int:
    spec: PackageSpec = run.spec
    fmt = FORMATS[spec.format]
    if spec.format == "parquet":
        check_available()
    for item in run.items:
        if item["key"] in run.done_keys:
            continue
        images = source_images(run)
        size = spec.samples_per_file
        files = [images[i : i + size] for i in range(0, len(images), size)]
        outputs = StepOutputs.start(run, item)
        for index, chunk in enumerate(files):
            name = f"{index:05d}"
            with tempfile.TemporaryDirectory(prefix="farm-package-") as tmp:
                path = Path(tmp) / f"{name}{fmt.suffix}"
                count = fmt.write(path, _samples(run, chunk, 0.95 * index / len(files), 0.95 / len(files)))
                data = path.read_bytes()
            key = artifact_key(spec.output_prefix, run.job_id, run.shard_index, name, fmt.suffix.lstrip("."))
            params = lineage_params(run, chunk, format=spec.format, samples=count)
            outputs.record(key, data, fmt.content_type, params, progress=0.95 * (index + 1) / len(files))
        outputs.finish(format=spec.format, samples=len(images), files=len(files))
    return run.items_done
