"""One contract for every object store: the local folder and S3 (a real SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from farm.errors import FarmError, InvalidKey, ObjectNotFound, StorageAccessDenied, StorageUnavailable
from storage.objects import ObjectStore
from tests.fixtures.seaweed import make_s3_store
from tests.fixtures.services import free_port


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_is_an_object_store(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_bytes_round_trip(store: ObjectStore) -> None:
    data = os.urandom(4096)
    info = store.put_bytes("job1/00000/000001.png", data, content_type="image/png")
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("job1/00000/000001.png") == data
    head = store.head("job1/00000/000001.png")
    assert head is not None and head.size == len(data) and head.sha256 == info.sha256
    assert head.content_type == "image/png"


def test_file_upload_and_download(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(10_000))
    info = store.put_file("a/b/c.json", src, content_type="application/json")
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    out = store.download("a/b/c.json", tmp_path / "out" / "c.json")
    assert out.read_bytes() == src.read_bytes()


def test_missing_objects(store: ObjectStore, tmp_path: Path) -> None:
    assert store.head("nope/x.png") is None
    assert not store.exists("nope/x.png")
    with pytest.raises(ObjectNotFound) as info:
        store.get_bytes("nope/x.png")
    assert isinstance(info.value, FarmError) and not info.value.retryable
    with pytest.raises(ObjectNotFound):
        store.download("nope/x.png", tmp_path / "x.png")


def test_overwrite_and_delete(store: ObjectStore) -> None:
    store.put_bytes("k/one.txt", b"first")
    store.put_bytes("k/one.txt", b"second")
    assert store.get_bytes("k/one.txt") == b"second"
    assert store.exists("k/one.txt")
    store.delete("k/one.txt")
    assert not store.exists("k/one.txt")
    store.delete("k/one.txt")  # deleting a missing object is not an error


def test_list_is_sorted_and_scoped(store: ObjectStore) -> None:
    for key in ("j/00001/b.png", "j/00000/a.png", "j/00000/c.png", "jx/other.png", "k/z.png"):
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("j")] == ["j/00000/a.png", "j/00000/c.png", "j/00001/b.png"]
    assert [o.key for o in store.list("j/00000")] == ["j/00000/a.png", "j/00000/c.png"]
    assert [o.key for o in store.list("missing")] == []
    assert {o.size for o in store.list("k")} == {len(b"k/z.png")}


def test_url_gives_the_bytes(store: ObjectStore) -> None:
    store.put_bytes("u/v.txt", b"hello url")
    url = store.url("u/v.txt", expires_s=60)
    assert url.startswith(("file://", "http://"))
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"hello url"


@pytest.mark.parametrize("key", ["../x", "/abs/x", "a//b", "a/../b", "a\x00b", "", "a/./b", "a b", ".hidden"])
def test_invalid_keys_refused_before_io(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidKey):
        store.get_bytes(key)


# -- S3 only -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_multipart_upload(seaweedfs, tmp_path: Path) -> None:
    store = make_s3_store(seaweedfs, multipart_threshold=5 << 20, multipart_chunk=5 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))
    info = store.put_file("big/blob.txt", src)
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    head = store.head("big/blob.txt")
    assert head is not None and head.size == 11 << 20 and head.sha256 == info.sha256
    assert store.get_bytes("big/blob.txt") == src.read_bytes()
    # A multipart object's ETag carries the part count after a dash.
    raw = store._client.head_object(Bucket=store.bucket, Key="big/blob.txt")
    assert raw["ETag"].strip('"').endswith("-3")


@pytest.mark.integration
def test_s3_wrong_secret_is_access_denied(seaweedfs, s3_store) -> None:
    s3_store.put_bytes("x/y.txt", b"secret data")
    from storage.objects.s3 import S3Store

    bad_secret = "wrong-" + seaweedfs.secret_access_key
    bad = S3Store(
        s3_store.bucket,
        prefix=s3_store.prefix,
        endpoint_url=seaweedfs.endpoint_url,
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=bad_secret,
        max_attempts=1,
    )
    with pytest.raises(StorageAccessDenied) as info:
        bad.get_bytes("x/y.txt")
    assert not info.value.retryable
    for text in (str(info.value), bad.describe(), repr(info.value)):
        assert seaweedfs.secret_access_key not in text and bad_secret not in text


@pytest.mark.integration
def test_s3_tampered_presigned_url_rejected(s3_store) -> None:
    s3_store.put_bytes("p/q.txt", b"presigned")
    url = s3_store.url("p/q.txt", expires_s=60)
    tampered = url.replace("p/q.txt", "p/r.txt")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(tampered, timeout=10)
    assert info.value.code == 403


@pytest.mark.integration
def test_s3_unreachable_endpoint_is_retryable(seaweedfs) -> None:
    from storage.objects.s3 import S3Store

    store = S3Store(
        "nowhere",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="a",
        secret_access_key=seaweedfs.secret_access_key,
        max_attempts=1,
    )
    with pytest.raises(StorageUnavailable) as info:
        store.get_bytes("a/b.txt")
    assert info.value.retryable
    assert seaweedfs.secret_access_key not in str(info.value)


@pytest.mark.integration
def test_s3_missing_bucket_without_create_is_a_clear_error(seaweedfs) -> None:
    from farm.errors import ConfigError

    with pytest.raises(ConfigError, match="absent-bucket-xyz"):
        make_s3_store(seaweedfs, bucket="absent-bucket-xyz", create_bucket=False)
