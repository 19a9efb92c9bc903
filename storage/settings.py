"""Storage's sections of the settings: the database, and the object store (local folder or S3).

Plain pydantic models, read by nobody here: :class:`farm.settings.FarmSettings` composes them
(``FarmSettings.db``, ``FarmSettings.storage``) and fills them from ``FARM_DB__*`` and
``FARM_STORAGE__*`` environment variables. They live in storage so that the code that uses them
(:meth:`storage.objects.S3Store.from_settings`, :func:`storage.objects.open_store`) needs nothing
from ``farm``. :class:`Section` is the base of every settings section, storage's and the farm's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["DatabaseSettings", "S3Settings", "Section", "StorageSettings"]


class Section(BaseModel):
    """One section of the settings: unknown fields are refused, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatabaseSettings(Section):
    """Where job, shard, artifact and worker state lives."""

    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://farm:PASS@db/farm. "
        "Default: SQLite file farm.db in the data folder.",
    )
    echo: bool = Field(default=False, description="Log every SQL statement (debugging only).")
    pool_size: int = Field(default=5, ge=1, le=100, description="Connections kept per process (not SQLite).")


class S3Settings(Section):
    """Any S3-compatible endpoint: AWS, MinIO, SeaweedFS."""

    endpoint_url: str | None = Field(default=None, description="e.g. http://127.0.0.1:8333; empty for AWS.")
    region: str = Field(default="us-east-1", description="Signing region.")
    bucket: str = Field(default="farm", description="Bucket holding all outputs.")
    prefix: str = Field(default="", description="Key prefix inside the bucket, e.g. renders/prod.")
    access_key_id: SecretStr | None = Field(default=None, description="Access key; empty = boto3's default chain.")
    secret_access_key: SecretStr | None = Field(default=None, description="Secret key; never logged.")
    multipart_threshold_mb: int = Field(default=64, ge=5, description="Files above this upload in parts.")
    multipart_chunk_mb: int = Field(default=16, ge=5, description="Part size for multipart uploads.")
    presign_expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned URLs.")
    create_bucket: bool = Field(default=False, description="Create the bucket on first use if missing.")


class StorageSettings(Section):
    """Where rendered outputs and manifests go."""

    backend: Literal["local", "s3"] = Field(default="local", description="local folder or S3.")
    local_root: Path | None = Field(default=None, description="Folder for the local store. Default: DATA/objects.")
    s3: S3Settings = Field(default_factory=S3Settings)

    def local_folder(self, data_dir: Path) -> Path:
        """The local store's folder: ``local_root``, else ``objects`` in the data folder."""
        return self.local_root or data_dir / "objects"
