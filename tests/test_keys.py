"""Object keys: deterministic layout, and nothing unsafe ever gets through."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farm.errors import InvalidKey
from storage.objects.keys import artifact_key, join_key, manifest_key, validate_part, validate_prefix

JOB = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_artifact_and_manifest_layout() -> None:
    assert artifact_key("renders/prod", JOB, 3, 12, "png") == f"renders/prod/{JOB}/00003/000012.png"
    assert artifact_key("", JOB, 0, "000001-s42", "png") == f"{JOB}/00000/000001-s42.png"
    assert manifest_key("renders", JOB) == f"renders/{JOB}/manifest.json"
    assert artifact_key("r", JOB, 1, 2, "png") == artifact_key("r", JOB, 1, 2, "png")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: artifact_key("../x", JOB, 0, 1, "png"), "prefix"),
        (lambda: artifact_key("/abs", JOB, 0, 1, "png"), "prefix"),
        (lambda: artifact_key("ok", "../../etc", 0, 1, "png"), "job_id"),
        (lambda: artifact_key("ok", JOB, -1, 1, "png"), "shard_index"),
        (lambda: artifact_key("ok", JOB, 0, "a/b", "png"), "item"),
        (lambda: artifact_key("ok", JOB, 0, 1, "exe"), "extension"),
        (lambda: artifact_key("ok", JOB, 0, -5, "png"), "item"),
        (lambda: validate_prefix("a//b"), "prefix"),
        (lambda: validate_part("a\nb", "name"), "name"),
    ],
)
def test_bad_parts_name_the_field(call, field: str) -> None:
    with pytest.raises(InvalidKey, match=field):
        call()


def _assert_safe(key: str) -> None:
    assert key and not key.startswith("/")
    segments = key.split("/")
    assert all(segments) and ".." not in key
    assert all(s not in {".", ".."} and not s.startswith(".") for s in segments)
    assert all(ch.isprintable() and ch not in "\\ " for ch in key)


@given(st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_join_key_is_safe_or_refuses(parts: list[str]) -> None:
    try:
        key = join_key(*parts)
    except InvalidKey:
        return
    _assert_safe(key)


@given(
    prefix=st.text(max_size=30),
    job=st.text(max_size=40),
    shard=st.integers(min_value=-5, max_value=200_000),
    item=st.one_of(st.integers(min_value=-5, max_value=10**7), st.text(max_size=20)),
)
def test_artifact_key_is_safe_or_refuses(prefix: str, job: str, shard: int, item) -> None:
    try:
        key = artifact_key(prefix, job, shard, item, "png")
    except InvalidKey:
        return
    _assert_safe(key)
    assert key.endswith(".png")
    assert key == artifact_key(prefix, job, shard, item, "png")
