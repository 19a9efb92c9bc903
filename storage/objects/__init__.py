"""Object storage: one protocol, a local folder and S3, keys built from validated parts.

``S3Store`` is imported on first use (``from storage.objects import S3Store`` works), so importing
this package does not load boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.objects.base import ObjectInfo, ObjectStore, guess_content_type
from storage.objects.keys import (
    artifact_key,
    job_prefix,
    join_key,
    manifest_key,
    validate_key,
    validate_part,
    validate_prefix,
)
from storage.objects.local import LocalStore

if TYPE_CHECKING:
    from pathlib import Path

    from storage.objects.s3 import S3Store
    from storage.settings import StorageSettings

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "artifact_key",
    "guess_content_type",
    "job_prefix",
    "join_key",
    "manifest_key",
    "open_store",
    "validate_key",
    "validate_part",
    "validate_prefix",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from storage.objects.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(section: StorageSettings, data_dir: Path) -> ObjectStore:
    """The object store the storage ``section`` of the settings describes: S3 for ``backend=s3``,
    else a local folder (``section.local_root``, else ``data_dir/objects``: see
    :meth:`~storage.settings.StorageSettings.local_folder`)."""
    if section.backend == "s3":
        from storage.objects.s3 import S3Store

        return S3Store.from_settings(section.s3)
    return LocalStore(section.local_folder(data_dir))
