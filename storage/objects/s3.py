"""Any S3-compatible endpoint (AWS, MinIO, SeaweedFS) as an object store, through boto3.

Every botocore failure goes through :func:`_translate`, the one place that decides which of our
errors it becomes and whether retrying can help. Messages name the operation, bucket and key,
never the credentials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from farm.errors import ConfigError, ObjectNotFound, StorageAccessDenied, StorageError, StorageUnavailable
from storage.objects.base import ObjectInfo
from storage.objects.keys import join_key, validate_key, validate_prefix

if TYPE_CHECKING:
    from farm.settings import S3Settings

MiB = 1 << 20
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden", "AllAccessDisabled"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}


def _translate(exc: Exception, op: str, where: str) -> StorageError:
    """Map a botocore error from ``op`` on ``where`` (bucket/key) to the farm's storage errors."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _NOT_FOUND or status == 404:
            return ObjectNotFound(f"{op} {where}: not found ({code or status})")
        if code in _DENIED or status == 403:
            return StorageAccessDenied(f"{op} {where}: access denied ({code or status}); check the credentials")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return StorageUnavailable(f"{op} {where}: the store is unavailable ({code or status})")
        return StorageError(f"{op} {where}: {code or status}")
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ConnectTimeoutError | ReadTimeoutError):
        return StorageUnavailable(f"{op} {where}: cannot reach the store ({type(exc).__name__})")
    return StorageError(f"{op} {where}: {type(exc).__name__}")


class S3Store:
    """Objects in ``bucket`` under ``prefix``; keys given to methods are relative to the prefix."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunk: int = 16 * MiB,
        presign_expiry_s: int = 3600,
        create_bucket: bool = False,
        max_attempts: int = 4,
    ) -> None:
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.presign_expiry_s = presign_expiry_s
        self.create_bucket = create_bucket
        self._bucket_checked = False
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunk, use_threads=False
        )
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=60,
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    @classmethod
    def from_settings(cls, s3: S3Settings) -> S3Store:
        return cls(
            s3.bucket,
            prefix=s3.prefix,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            access_key_id=s3.access_key_id.get_secret_value() if s3.access_key_id else None,
            secret_access_key=s3.secret_access_key.get_secret_value() if s3.secret_access_key else None,
            multipart_threshold=s3.multipart_threshold_mb * MiB,
            multipart_chunk=s3.multipart_chunk_mb * MiB,
            presign_expiry_s=s3.presign_expiry_s,
            create_bucket=s3.create_bucket,
        )

    def describe(self) -> str:
        where = self.endpoint_url or "AWS"
        return f"S3Store s3://{self.bucket}/{self.prefix} at {where}"

    # -- helpers ----------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def _call(self, op: str, key: str | None, fn, /, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket}"
            raise _translate(exc, op, where) from None

    def ensure_bucket(self) -> None:
        """Check the bucket exists; create it when allowed, else raise a clear error."""
        if self._bucket_checked:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            error = _translate(exc, "head_bucket", f"bucket {self.bucket}")
            if not isinstance(error, ObjectNotFound):
                raise error from None
            if not self.create_bucket:
                raise ConfigError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}; create it "
                    "or set FARM_STORAGE__S3__CREATE_BUCKET=true"
                ) from None
            self._call("create_bucket", None, self._client.create_bucket, Bucket=self.bucket)
        except BotoCoreError as exc:
            raise _translate(exc, "head_bucket", f"bucket {self.bucket}") from None
        self._bucket_checked = True

    def _info(self, key: str, head: dict[str, Any]) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=int(head.get("ContentLength", 0)),
            sha256=(head.get("Metadata") or {}).get("sha256"),
            content_type=head.get("ContentType"),
            last_modified=head.get("LastModified"),
        )

    # -- writes -----------------------------------------------------------------------------
    def put_bytes(
        self, key: str, data: bytes, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        full = self._full(key)
        self.ensure_bucket()
        sha = hashlib.sha256(data).hexdigest()
        extra: dict[str, Any] = {"Metadata": {**(metadata or {}), "sha256": sha}}
        if content_type:
            extra["ContentType"] = content_type
        self._call("put_object", full, self._client.put_object, Bucket=self.bucket, Key=full, Body=data, **extra)
        return ObjectInfo(key=key, size=len(data), sha256=sha, content_type=content_type)

    def put_file(
        self, key: str, path: Path, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        full = self._full(key)
        self.ensure_bucket()
        digest = hashlib.sha256()
        with Path(path).open("rb") as fh:
            while chunk := fh.read(MiB):
                digest.update(chunk)
        sha = digest.hexdigest()
        extra: dict[str, Any] = {"Metadata": {**(metadata or {}), "sha256": sha}}
        if content_type:
            extra["ContentType"] = content_type
        self._call(
            "upload_file",
            full,
            self._client.upload_file,
            Filename=str(path),
            Bucket=self.bucket,
            Key=full,
            ExtraArgs=extra,
            Config=self._transfer,
        )
        return ObjectInfo(key=key, size=Path(path).stat().st_size, sha256=sha, content_type=content_type)

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call("delete_object", full, self._client.delete_object, Bucket=self.bucket, Key=full)

    # -- reads ------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        response = self._call("get_object", full, self._client.get_object, Bucket=self.bucket, Key=full)
        try:
            return response["Body"].read()
        except BotoCoreError as exc:
            raise _translate(exc, "get_object", f"s3://{self.bucket}/{full}") from None

    def download(self, key: str, path: Path) -> Path:
        full = self._full(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call(
            "download_file",
            full,
            self._client.download_file,
            Bucket=self.bucket,
            Key=full,
            Filename=str(dest),
            Config=self._transfer,
        )
        return dest

    def head(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        try:
            head = self._call("head_object", full, self._client.head_object, Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            return None
        return self._info(key, head)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        rel = validate_prefix(prefix)
        full = join_key(self.prefix, rel) + "/" if (self.prefix or rel) else ""
        paginator = self._client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: list[ObjectInfo] = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            key=obj["Key"][strip:],
                            size=int(obj["Size"]),
                            last_modified=obj.get("LastModified"),
                        )
                    )
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, "list_objects", f"s3://{self.bucket}/{full}") from None
        return iter(sorted(found, key=lambda o: o.key))

    def url(self, key: str, expires_s: int | None = None) -> str:
        full = self._full(key)
        return self._call(
            "presign",
            full,
            self._client.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": self.bucket, "Key": full},
            ExpiresIn=expires_s or self.presign_expiry_s,
        )
