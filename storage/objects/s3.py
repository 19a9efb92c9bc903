"""Any S3-compatible endpoint (AWS, MinIO, SeaweedFS) as an object store, through boto3.

Keys given to :class:`S3Store` are relative to its ``prefix`` inside the bucket. Every botocore
failure goes through :func:`_translate`, the one place that decides which of the farm's errors
it becomes and whether retrying can help. Messages name the operation, bucket and key, never
credentials. ``put_*`` stores the content's sha256 as user metadata (``x-amz-meta-sha256``), so
``head`` can return it for objects the farm wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from storage.errors import (
    ConfigError,
    ObjectNotFound,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
    UserError,
)
from storage.objects.base import ObjectInfo, guess_content_type
from storage.objects.keys import join_key, validate_key, validate_prefix
from storage.urls import redact_url

if TYPE_CHECKING:
    from storage.settings import S3Settings

MiB = 1 << 20
MAX_PRESIGN_S = 7 * 24 * 3600  # the SigV4 limit
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
    "RequestTimeTooSkewed",
}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_ERRORS = (ClientError, BotoCoreError, S3UploadFailedError, RetriesExceededError)


def _translate(exc: BaseException, op: str, key: str | None, *, bucket: str | None = None) -> StorageError:
    """Map a botocore/boto3 failure of ``op`` on ``key`` (in ``bucket``) to the farm's storage errors.

    NoSuchKey/404 -> ObjectNotFound; AccessDenied, bad key id or signature, 403 -> StorageAccessDenied;
    5xx, throttling and connection failures -> StorageUnavailable (retryable); anything else ->
    StorageError. Only the error code and our own words go into the message.
    """
    where = f"{op} s3://{bucket or '?'}/{key}" if key is not None else f"{op} bucket {bucket or '?'}"
    # boto3's transfer manager wraps the real error: unwrap it.
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError | BotoCoreError):
        exc = exc.__context__
    if isinstance(exc, RetriesExceededError) and isinstance(exc.last_exception, ClientError | BotoCoreError):
        exc = exc.last_exception
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        label = code or str(status)
        if code == "NoSuchBucket":
            return StorageError(f"{where}: the bucket does not exist ({label})")
        if code in _NOT_FOUND or status == 404:
            return ObjectNotFound(f"{where}: no such object ({label})")
        if code in _DENIED or status == 403:
            return StorageAccessDenied(f"{where}: access denied ({label}); check the credentials and permissions")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return StorageUnavailable(f"{where}: the store is unavailable ({label})")
        return StorageError(f"{where}: refused ({label})")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageAccessDenied(f"{where}: no usable credentials ({type(exc).__name__})")
    if isinstance(exc, SSLError):
        return StorageError(f"{where}: TLS failure ({type(exc).__name__})")
    if isinstance(exc, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return StorageUnavailable(f"{where}: cannot reach the store ({type(exc).__name__})")
    return StorageError(f"{where}: failed ({type(exc).__name__})")


class S3Store:
    """Objects in ``bucket`` under ``prefix``; keys given to methods are relative to the prefix.

    With ``create_bucket`` the first write creates a missing bucket, otherwise it raises a
    :class:`ConfigError` naming it. ``access_key_id``/``secret_access_key`` of ``None`` use
    boto3's default credential chain.
    """

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
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        if not bucket:
            raise ConfigError("S3 bucket: must not be empty")
        if not 1 <= presign_expiry_s <= MAX_PRESIGN_S:
            raise ConfigError(f"S3 presign_expiry_s: must be within 1..{MAX_PRESIGN_S}")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.region = region
        self.presign_expiry_s = presign_expiry_s
        self.create_bucket = create_bucket
        self._bucket_checked = False
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunk)
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
        )
        try:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=config,
            )
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(f"S3 client for {self.describe()}: {type(exc).__name__}") from None

    @classmethod
    def from_settings(cls, s3: S3Settings) -> S3Store:
        """The store ``FARM_STORAGE__S3__*`` settings describe."""
        return cls(
            s3.bucket,
            prefix=s3.prefix,
            endpoint_url=s3.endpoint_url or None,
            region=s3.region,
            access_key_id=s3.access_key_id.get_secret_value() if s3.access_key_id else None,
            secret_access_key=s3.secret_access_key.get_secret_value() if s3.secret_access_key else None,
            multipart_threshold=s3.multipart_threshold_mb * MiB,
            multipart_chunk=s3.multipart_chunk_mb * MiB,
            presign_expiry_s=s3.presign_expiry_s,
            create_bucket=s3.create_bucket,
        )

    def describe(self) -> str:
        where = redact_url(self.endpoint_url) or f"AWS ({self.region})"
        return f"S3Store s3://{self.bucket}/{self.prefix} at {where}"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    # -- helpers ----------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def _call(self, op: str, key: str | None, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except _ERRORS as exc:
            raise _translate(exc, op, key, bucket=self.bucket) from None

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def ensure_bucket(self) -> None:
        """Check the bucket exists; create it when allowed, else raise a :class:`ConfigError` naming it."""
        if self._bucket_checked:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 404:
                raise _translate(exc, "head_bucket", None, bucket=self.bucket) from None
            if not self.create_bucket:
                raise ConfigError(
                    f"bucket {self.bucket!r} does not exist at {redact_url(self.endpoint_url) or 'AWS'}; "
                    "create it or set FARM_STORAGE__S3__CREATE_BUCKET=true"
                ) from None
            self._create_bucket()
        except _ERRORS as exc:
            raise _translate(exc, "head_bucket", None, bucket=self.bucket) from None
        self._bucket_checked = True

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1" and not self.endpoint_url:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":  # lost a harmless race
                raise _translate(exc, "create_bucket", None, bucket=self.bucket) from None

    def _extra(
        self, key: str, sha256: str, content_type: str | None, metadata: dict[str, str] | None
    ) -> dict[str, Any]:
        return {
            "ContentType": content_type or guess_content_type(key),
            "Metadata": {**(metadata or {}), "sha256": sha256},
        }

    # -- writes -----------------------------------------------------------------------------
    def put_bytes(
        self, key: str, data: bytes, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        full = self._full(key)
        self.ensure_bucket()
        sha = hashlib.sha256(data).hexdigest()
        extra = self._extra(key, sha, content_type, metadata)
        response = self._call(
            "put_object", full, self._client.put_object, Bucket=self.bucket, Key=full, Body=data, **extra
        )
        return ObjectInfo(
            key=key, size=len(data), sha256=sha, etag=response.get("ETag"), content_type=extra["ContentType"]
        )

    def put_file(
        self, key: str, path: Path, content_type: str | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectInfo:
        """Upload a file; above ``multipart_threshold`` it goes in ``multipart_chunk`` parts."""
        full = self._full(key)
        path = Path(path)
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(MiB):
                digest.update(chunk)
        self.ensure_bucket()
        extra = self._extra(key, digest.hexdigest(), content_type, metadata)
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
        return ObjectInfo(
            key=key, size=path.stat().st_size, sha256=digest.hexdigest(), content_type=extra["ContentType"]
        )

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call("delete_object", full, self._client.delete_object, Bucket=self.bucket, Key=full)

    # -- reads ------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            with response["Body"] as body:
                return body.read()
        except _ERRORS as exc:
            raise _translate(exc, "get_object", full, bucket=self.bucket) from None

    def read_chunks(self, key: str, start: int = 0) -> Iterator[bytes]:
        full = self._full(key)
        ranged = {"Range": f"bytes={start}-"} if start > 0 else {}
        response = self._call("get_object", full, self._client.get_object, Bucket=self.bucket, Key=full, **ranged)
        return self._chunks_of(response["Body"], full)

    def _chunks_of(self, body: Any, full: str) -> Iterator[bytes]:
        with body:
            try:
                while chunk := body.read(MiB):
                    yield chunk
            except _ERRORS as exc:
                raise _translate(exc, "get_object", full, bucket=self.bucket) from None

    def download(self, key: str, path: Path) -> Path:
        """Download to ``path`` (via a temporary file, renamed when complete)."""
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
        return ObjectInfo(
            key=key,
            size=int(head.get("ContentLength", 0)),
            sha256=(head.get("Metadata") or {}).get("sha256"),
            etag=head.get("ETag"),
            content_type=head.get("ContentType"),
            last_modified=head.get("LastModified"),
        )

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under ``prefix``, sorted by key; ``sha256`` is left out (``head`` has it).

        The listing is read completely before returning (errors surface here, not mid-iteration),
        and sorted here rather than trusting the server's order.
        """
        rel = validate_prefix(prefix)
        full = join_key(self.prefix, rel) + "/" if (self.prefix or rel) else ""
        found: list[ObjectInfo] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            key=self._relative(obj["Key"]),
                            size=int(obj["Size"]),
                            etag=obj.get("ETag"),
                            last_modified=obj.get("LastModified"),
                        )
                    )
        except _ERRORS as exc:
            raise _translate(exc, "list_objects", full, bucket=self.bucket) from None
        return iter(sorted(found, key=lambda o: o.key))

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A presigned GET URL, valid ``expires_s`` seconds (default: ``presign_expiry_s``)."""
        full = self._full(key)
        expires = self.presign_expiry_s if expires_s is None else expires_s
        if not 1 <= expires <= MAX_PRESIGN_S:
            raise UserError(f"expires_s: must be within 1..{MAX_PRESIGN_S}, got {expires}")
        return self._call(
            "presign",
            full,
            self._client.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": self.bucket, "Key": full},
            ExpiresIn=expires,
        )
