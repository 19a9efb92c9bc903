"""Bulk renders as datasets a training pipeline reads directly: WebDataset tar shards, Parquet
files (with the images' bytes), or plain files, with a stats JSON per shard, a manifest of
shards with their sha256, and a dataset card; written incrementally, images streamed.

- :mod:`farm.datasets.package`: :func:`package_bulk`, the manifest and the incremental rules.
- :mod:`farm.datasets.rows`: rendered and failed rows read from the database, a page at a time.
- :mod:`farm.datasets.tar_shards`, :mod:`~farm.datasets.parquet_shards`,
  :mod:`~farm.datasets.file_shards`: one writer per format; :mod:`farm.datasets.formats` names them
  (the ``package`` step, :mod:`farm.worker.kinds.package`, writes through them too).
- :mod:`farm.datasets.targets`: a local folder or a prefix in the object store.
- :mod:`farm.datasets.card`: the dataset card (``README.md``).
"""
