"""One contract for every object store: the local folder and S3 (a real SeaweedFS, not a mock).

Run with the SeaweedFS fixtures loaded (``pytest_plugins`` in tests/conftest.py, or
``-p tests.fixtures.seaweed``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from farm.errors import (
    ConfigError,
    FarmError,
    InvalidKey,
    NotFound,
    ObjectNotFound,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
)
from farm.settings import FarmSettings
from storage.objects import LocalStore, ObjectStore, open_store
from storage.objects.s3 import S3Store, _translate
from tests.fixtures.seaweed import SeaweedS3, make_s3_store
from tests.fixtures.services import free_port

BAD_KEYS = ["../x", "/abs/x", "a//b", "a/../b", "a\x00b", "", "a/./b", "a b", ".hidden", "a\\b", "a/", "x" * 129]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


# -- the shared contract -----------------------------------------------------------------------


def test_is_an_object_store(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_bytes_round_trip_with_sha256(store: ObjectStore) -> None:
    data = os.urandom(4096)
    info = store.put_bytes("job1/00000/000001.png", data, content_type="image/png")
    assert (info.key, info.size) == ("job1/00000/000001.png", len(data))
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("job1/00000/000001.png") == data
    head = store.head("job1/00000/000001.png")
    assert head is not None
    assert (head.key, head.size, head.sha256, head.content_type) == (info.key, len(data), info.sha256, "image/png")
    assert head.last_modified is not None


def test_read_chunks_streams_from_an_offset(store: ObjectStore) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # more than one chunk
    key = "models/blobs/sha256/" + hashlib.sha256(data).hexdigest()
    store.put_bytes(key, data)
    assert b"".join(store.read_chunks(key)) == data
    assert b"".join(store.read_chunks(key, 1_000_001)) == data[1_000_001:]  # a resumed download
    with pytest.raises(ObjectNotFound):
        b"".join(store.read_chunks("models/blobs/sha256/" + "0" * 64))


def test_content_type_defaults_to_the_extension(store: ObjectStore) -> None:
    info = store.put_bytes("m/manifest.json", b"{}")
    head = store.head("m/manifest.json")
    assert info.content_type == "application/json"
    assert head is not None and head.content_type == "application/json"


def test_file_upload_and_download(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    info = store.put_file("a/b/c.json", src, content_type="application/json")
    assert info.size == 300_000
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    head = store.head("a/b/c.json")
    assert head is not None and head.sha256 == info.sha256
    out = store.download("a/b/c.json", tmp_path / "out" / "deeper" / "c.json")
    assert out == tmp_path / "out" / "deeper" / "c.json"
    assert out.read_bytes() == src.read_bytes()
    out.write_bytes(b"stale")
    store.download("a/b/c.json", out)  # replaces an existing file
    assert out.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.json"]  # no temporary files left


def test_missing_objects(store: ObjectStore, tmp_path: Path) -> None:
    assert store.head("nope/x.png") is None
    assert not store.exists("nope/x.png")
    with pytest.raises(ObjectNotFound) as info:
        store.get_bytes("nope/x.png")
    error = info.value
    assert isinstance(error, FarmError) and isinstance(error, NotFound) and isinstance(error, StorageError)
    assert not error.retryable
    assert "nope/x.png" in str(error)
    with pytest.raises(ObjectNotFound):
        store.download("nope/x.png", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_folder_is_not_an_object(store: ObjectStore) -> None:
    store.put_bytes("dir/inner.txt", b"x")
    assert not store.exists("dir")
    assert store.head("dir") is None
    with pytest.raises(ObjectNotFound):
        store.get_bytes("dir")
    store.delete("dir")  # nothing there: no error, and the object inside stays
    assert store.exists("dir/inner.txt")


def test_exists_overwrite_and_idempotent_delete(store: ObjectStore) -> None:
    assert not store.exists("k/one.txt")
    store.put_bytes("k/one.txt", b"first")
    assert store.exists("k/one.txt")
    info = store.put_bytes("k/one.txt", b"second!")
    assert store.get_bytes("k/one.txt") == b"second!"
    head = store.head("k/one.txt")
    assert head is not None and head.size == 7 and head.sha256 == info.sha256 == hashlib.sha256(b"second!").hexdigest()
    store.delete("k/one.txt")
    assert not store.exists("k/one.txt")
    store.delete("k/one.txt")  # deleting a missing object is not an error
    with pytest.raises(ObjectNotFound):
        store.get_bytes("k/one.txt")


def test_list_is_sorted_and_scoped(store: ObjectStore) -> None:
    keys = ["j/00001/b.png", "j/00000/a.png", "j/00000/c.png", "jx/other.png", "k/z.png", "s/a/b.png", "s/a-c.png"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("j")] == ["j/00000/a.png", "j/00000/c.png", "j/00001/b.png"]
    assert [o.key for o in store.list("j/")] == ["j/00000/a.png", "j/00000/c.png", "j/00001/b.png"]
    assert [o.key for o in store.list("j/00000")] == ["j/00000/a.png", "j/00000/c.png"]
    assert [o.key for o in store.list("missing")] == []
    assert [o.key for o in store.list("k/z.png")] == []  # an object is not a folder
    # Sorted by the whole key ('-' < '/'), not folder by folder.
    assert [o.key for o in store.list("s")] == ["s/a-c.png", "s/a/b.png"]
    assert [o.key for o in store.list("")] == sorted(keys)
    assert [(o.key, o.size) for o in store.list("k")] == [("k/z.png", len(b"k/z.png"))]


def test_url_reads_the_object(store: ObjectStore) -> None:
    store.put_bytes("u/v.txt", b"hello url")
    url = store.url("u/v.txt", expires_s=60)
    assert _fetch(url) == b"hello url"
    assert store.url("u/v.txt").startswith(url.split("?")[0])  # default expiry works too


def test_local_url_is_the_file(local_store: LocalStore) -> None:
    local_store.put_bytes("u/v.txt", b"hello")
    url = local_store.url("u/v.txt")
    parsed = urllib.parse.urlparse(url)
    assert parsed.scheme == "file"
    path = Path(urllib.request.url2pathname(parsed.path))
    assert path == local_store.root / "u" / "v.txt"
    assert path.read_bytes() == b"hello"


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(store: ObjectStore, key: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    calls = {
        "put_bytes": lambda: store.put_bytes(key, b"x"),
        "put_file": lambda: store.put_file(key, src),
        "get_bytes": lambda: store.get_bytes(key),
        "download": lambda: store.download(key, tmp_path / "out.bin"),
        "head": lambda: store.head(key),
        "exists": lambda: store.exists(key),
        "delete": lambda: store.delete(key),
        "url": lambda: store.url(key),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidKey):
            call()
            pytest.fail(f"{name} accepted {key!r}")
    assert list(store.list("")) == []  # nothing was written
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("prefix", ["../x", "/abs", "a//b", "a\nb", ".."])
def test_invalid_list_prefixes_are_refused(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidKey):
        list(store.list(prefix))


def test_invalid_keys_are_refused_before_any_io(tmp_path: Path) -> None:
    """Stores that would fail on any I/O (no server, no folder) still answer InvalidKey."""
    unreachable = S3Store("nowhere", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    local = LocalStore(tmp_path / "never-created")
    for store in (unreachable, local):
        for key in BAD_KEYS:
            with pytest.raises(InvalidKey):
                store.put_bytes(key, b"x")
            with pytest.raises(InvalidKey):
                store.get_bytes(key)
            with pytest.raises(InvalidKey):
                store.head(key)
    assert not (tmp_path / "never-created").exists()


def test_local_store_stays_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "a" / "link").symlink_to(tmp_path / "outside")
    store = LocalStore(root)
    with pytest.raises(InvalidKey, match="escapes"):
        store.put_bytes("a/link/x.txt", b"x")
    assert list((tmp_path / "outside").iterdir()) == []


def test_local_writes_are_atomic_and_readable(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("a/b.png", b"png")
    folder = tmp_path / "objects" / "a"
    assert [p.name for p in folder.iterdir()] == ["b.png"]  # the temporary file was renamed
    assert (folder / "b.png").stat().st_mode & 0o044  # readable by others (mkstemp would give 0600)


def test_local_full_or_read_only_disk_is_retryable_and_leaves_nothing(small_disk) -> None:
    """A real full (ENOSPC) and read-only (EROFS) disk: retryable, store and key named, no
    temporary file left, and the same write succeeds once the disk has recovered."""
    disk = small_disk(size_mb=2)
    store = LocalStore(disk.path / "objects")
    store.put_bytes("a/first.png", b"x")
    big = os.urandom(3 << 20)  # more than the disk holds: fails part-way through the write
    with pytest.raises(StorageUnavailable) as part_way:
        store.put_bytes("a/big.png", big)
    disk.fill()
    with pytest.raises(StorageUnavailable) as full:
        store.put_bytes("b/c.png", b"png")
    disk.free()
    disk.read_only()
    try:
        with pytest.raises(StorageUnavailable) as read_only:
            store.put_bytes("b/c.png", b"png")
    finally:
        disk.writable()
    for error, code in ((part_way.value, "ENOSPC"), (full.value, "ENOSPC"), (read_only.value, "EROFS")):
        assert error.retryable and isinstance(error, StorageError), error
        assert f"({code})" in str(error) and store.describe() in str(error), error
    assert "'a/big.png'" in str(part_way.value) and "'b/c.png'" in str(read_only.value)
    assert disk.leftovers() == [], "a failed write left its temporary file"
    assert [o.key for o in store.list("")] == ["a/first.png"]
    assert store.put_bytes("b/c.png", b"png").size == 3  # recovered: the same write succeeds
    assert store.get_bytes("b/c.png") == b"png"


@pytest.mark.parametrize(
    ("code", "kind", "retryable"),
    [
        (errno.ENOSPC, StorageUnavailable, True),
        (errno.EDQUOT, StorageUnavailable, True),
        (errno.EROFS, StorageUnavailable, True),
        (errno.EIO, StorageUnavailable, True),
        (errno.EAGAIN, StorageUnavailable, True),
        (errno.ESTALE, StorageUnavailable, True),
        (errno.EACCES, StorageAccessDenied, False),
        (errno.ENAMETOOLONG, StorageError, False),
        (errno.EINVAL, StorageError, False),
    ],
)
def test_local_errors_say_whether_retrying_helps(code: int, kind: type, retryable: bool, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    error = store._failed(OSError(code, os.strerror(code)), "put", "renders/j/00000/a.png")
    assert type(error) is kind and error.retryable is retryable
    assert "'renders/j/00000/a.png'" in str(error) and store.describe() in str(error)


def test_a_temporary_file_that_could_not_be_removed_is_swept_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where removing a failed write's temporary file fails too (the folder went read-only
    mid-write), the next write of the store removes it."""
    import storage.objects.local as local

    store = LocalStore(tmp_path / "objects")

    def broken() -> Iterator[bytes]:
        yield b"half"
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(local, "_remove", lambda path: False)
    with pytest.raises(StorageUnavailable, match=r"\(EIO\)"):
        store._write("a/b.png", broken)
    left = [p.name for p in (tmp_path / "objects" / "a").iterdir()]
    assert len(left) == 1 and left[0].startswith(".tmp-")
    monkeypatch.undo()
    store.put_bytes("c/d.png", b"ok")
    assert list((tmp_path / "objects" / "a").iterdir()) == []


def test_open_store_local(tmp_path: Path) -> None:
    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data")
    store = open_store(settings.storage, settings.data_dir)
    assert isinstance(store, LocalStore) and store.root == (tmp_path / "data" / "objects").resolve()


# -- S3 only -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_open_store_s3_from_settings(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    settings = FarmSettings(
        _env_file=None,
        data_dir=tmp_path,
        storage={
            "backend": "s3",
            "s3": {
                "endpoint_url": seaweedfs.endpoint_url,
                "bucket": "settings-test",
                "prefix": "renders/prod",
                "access_key_id": seaweedfs.access_key_id,
                "secret_access_key": seaweedfs.secret_access_key,
                "create_bucket": True,
            },
        },
    )
    store = open_store(settings.storage, settings.data_dir)
    assert isinstance(store, S3Store) and store.bucket == "settings-test" and store.prefix == "renders/prod"
    store.put_bytes("job/manifest.json", b"{}")
    assert [o.key for o in store.list("job")] == ["job/manifest.json"]
    raw = store._client.head_object(Bucket="settings-test", Key="renders/prod/job/manifest.json")
    assert raw["ContentLength"] == 2  # the prefix is really in the bucket's key


@pytest.mark.integration
def test_s3_multipart_upload(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    store = make_s3_store(seaweedfs, multipart_threshold=5 << 20, multipart_chunk=5 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))
    info = store.put_file("big/blob.mp4", src)
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    assert info.sha256 == expected
    head = store.head("big/blob.mp4")
    assert head is not None and head.size == 11 << 20 and head.sha256 == expected
    assert head.content_type == "video/mp4"
    assert head.etag is not None and head.etag.strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert hashlib.sha256(store.get_bytes("big/blob.mp4")).hexdigest() == expected
    out = store.download("big/blob.mp4", tmp_path / "back.mp4")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected


@pytest.mark.integration
def test_s3_small_file_is_a_single_put(s3_store: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(b"small")
    s3_store.put_file("s/small.txt", src)
    head = s3_store.head("s/small.txt")
    assert head is not None and head.etag is not None and "-" not in head.etag.strip('"')


@pytest.mark.integration
def test_s3_metadata_is_kept(s3_store: S3Store) -> None:
    s3_store.put_bytes("meta/x.json", b"{}", metadata={"job": "j1"})
    raw = s3_store._client.head_object(Bucket=s3_store.bucket, Key="farm/tests/meta/x.json")
    assert raw["Metadata"] == {"job": "j1", "sha256": hashlib.sha256(b"{}").hexdigest()}


@pytest.mark.integration
def test_s3_wrong_secret_is_access_denied(seaweedfs: SeaweedS3, s3_store: S3Store, tmp_path: Path) -> None:
    s3_store.put_bytes("x/y.txt", b"secret data")
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    bad_secret = "wrong" + seaweedfs.secret_access_key[5:]
    bad = S3Store(
        s3_store.bucket,
        prefix=s3_store.prefix,
        endpoint_url=seaweedfs.endpoint_url,
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=bad_secret,
        max_attempts=1,
    )
    bad._bucket_checked = True  # reach put_object/upload_file themselves, not only the bucket check
    calls = {
        "get_bytes": lambda: bad.get_bytes("x/y.txt"),
        "head": lambda: bad.head("x/y.txt"),
        "put_bytes": lambda: bad.put_bytes("x/z.txt", b"z"),
        "put_file": lambda: bad.put_file("x/f.txt", src),
        "download": lambda: bad.download("x/y.txt", tmp_path / "out.txt"),
        "list": lambda: list(bad.list("x")),
    }
    for name, call in calls.items():
        with pytest.raises(StorageAccessDenied) as info:
            call()
            pytest.fail(f"{name} succeeded with a wrong secret")
        assert not info.value.retryable
        text = f"{info.value} {info.value!r} {bad.describe()} {bad!r}"
        assert seaweedfs.secret_access_key not in text and bad_secret not in text, name
        assert s3_store.bucket in str(info.value), name
    assert [o.key for o in s3_store.list("x")] == ["x/y.txt"]  # nothing was written


@pytest.mark.integration
def test_s3_describe_names_the_place_not_the_credentials(seaweedfs: SeaweedS3, s3_store: S3Store) -> None:
    text = s3_store.describe()
    assert seaweedfs.endpoint_url in text and s3_store.bucket in text and "farm/tests" in text
    for secret in (seaweedfs.secret_access_key, seaweedfs.access_key_id):
        assert secret not in text and secret not in repr(s3_store)


@pytest.mark.integration
def test_s3_presigned_url_is_needed(s3_store: S3Store) -> None:
    s3_store.put_bytes("p/q.txt", b"presigned")
    url = s3_store.url("p/q.txt", expires_s=60)
    assert "X-Amz-Signature=" in url
    with pytest.raises(urllib.error.HTTPError) as info:
        _fetch(url.split("?")[0])  # the bucket is not public
    assert info.value.code == 403


@pytest.mark.integration
def test_s3_tampered_presigned_url_is_rejected(s3_store: S3Store) -> None:
    s3_store.put_bytes("p/q.txt", b"presigned")
    s3_store.put_bytes("p/r.txt", b"other")
    url = s3_store.url("p/q.txt", expires_s=60)
    assert _fetch(url) == b"presigned"
    for tampered in (url.replace("p/q.txt", "p/r.txt"), url.replace("X-Amz-Expires=60", "X-Amz-Expires=61")):
        assert tampered != url
        with pytest.raises(urllib.error.HTTPError) as info:
            _fetch(tampered)
        assert info.value.code == 403


@pytest.mark.integration
def test_s3_expired_presigned_url_is_rejected(s3_store: S3Store) -> None:
    s3_store.put_bytes("p/q.txt", b"presigned")
    url = s3_store.url("p/q.txt", expires_s=1)
    time.sleep(2.5)
    with pytest.raises(urllib.error.HTTPError) as info:
        _fetch(url)
    assert info.value.code == 403


def test_s3_unreachable_endpoint_is_retryable() -> None:
    secret = "s3cr3t-" + os.urandom(8).hex()
    store = S3Store(
        "nowhere",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        access_key_id="AKIDEXAMPLE",
        secret_access_key=secret,
        max_attempts=1,
    )
    with pytest.raises(StorageUnavailable) as got:
        store.get_bytes("a/b.txt")
    with pytest.raises(StorageUnavailable) as put:
        store.put_bytes("a/b.txt", b"x")
    for error in (got.value, put.value):
        assert error.retryable and isinstance(error, FarmError)
        assert "nowhere" in str(error)
        assert secret not in str(error) and secret not in repr(error)
    assert secret not in store.describe() and "AKIDEXAMPLE" not in store.describe()


@pytest.mark.integration
def test_s3_missing_bucket_is_a_clear_error(seaweedfs: SeaweedS3) -> None:
    with pytest.raises(ConfigError, match="absent-bucket-xyz"):
        make_s3_store(seaweedfs, bucket="absent-bucket-xyz", create_bucket=False)
    reader = S3Store(
        "absent-bucket-xyz",
        endpoint_url=seaweedfs.endpoint_url,
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=seaweedfs.secret_access_key,
    )
    with pytest.raises(StorageError, match="absent-bucket-xyz") as info:
        reader.get_bytes("a/b.txt")
    assert not isinstance(info.value, ObjectNotFound)  # a missing bucket is not a missing object


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("exc", "kind", "retryable"),
    [
        (_client_error("NoSuchKey", 404), ObjectNotFound, False),
        (_client_error("404", 404), ObjectNotFound, False),
        (_client_error("AccessDenied", 403), StorageAccessDenied, False),
        (_client_error("InvalidAccessKeyId", 403), StorageAccessDenied, False),
        (_client_error("SignatureDoesNotMatch", 403), StorageAccessDenied, False),
        (_client_error("403", 403), StorageAccessDenied, False),
        (_client_error("SlowDown", 503), StorageUnavailable, True),
        (_client_error("Throttling", 400), StorageUnavailable, True),
        (_client_error("InternalError", 500), StorageUnavailable, True),
        (_client_error("BadGateway", 502), StorageUnavailable, True),
        (_client_error("NoSuchBucket", 404), StorageError, False),
        (_client_error("InvalidArgument", 400), StorageError, False),
        (EndpointConnectionError(endpoint_url="http://x"), StorageUnavailable, True),
        (ConnectTimeoutError(endpoint_url="http://x"), StorageUnavailable, True),
        (ReadTimeoutError(endpoint_url="http://x"), StorageUnavailable, True),
    ],
)
def test_translate_maps_each_failure_once(exc: Exception, kind: type, retryable: bool) -> None:
    error = _translate(exc, "get_object", "renders/j/00000/a.png", bucket="farm")
    assert type(error) is kind
    assert error.retryable is retryable
    assert "get_object" in str(error) and "s3://farm/renders/j/00000/a.png" in str(error)
