"""Object storage: one protocol, a local folder and S3, keys built from validated parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.objects.base import ObjectInfo, ObjectStore
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
    from farm.settings import FarmSettings

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "artifact_key",
    "job_prefix",
    "join_key",
    "manifest_key",
    "open_store",
    "validate_key",
    "validate_part",
    "validate_prefix",
]


def open_store(settings: FarmSettings) -> ObjectStore:
    """The object store the settings describe."""
    if settings.storage.backend == "s3":
        from storage.objects.s3 import S3Store

        return S3Store.from_settings(settings.storage.s3)
    return LocalStore(settings.local_store_root)
