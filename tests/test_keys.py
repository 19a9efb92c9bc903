"""Object keys: deterministic layout, and nothing unsafe ever gets through."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farm.errors import FarmError, InvalidKey
from storage.objects.keys import (
    MAX_PART_LENGTH,
    RESERVED_FOLDERS,
    artifact_key,
    check_output_folder,
    job_prefix,
    join_key,
    manifest_key,
    validate_key,
    validate_part,
    validate_prefix,
)

JOB = uuid.UUID("12345678-1234-5678-1234-567812345678")

# Text that often looks like a path: separators, dots, spaces, NUL, a newline, a non-ASCII letter.
PATHY = st.text(alphabet="ab1._-/\\ \x00\n\u00e9", max_size=24)
ANY_TEXT = st.one_of(st.text(max_size=40), PATHY)
VALID_PART = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}(\.[A-Za-z0-9_-]{1,8})?", fullmatch=True)


def test_artifact_and_manifest_layout() -> None:
    assert artifact_key("renders/prod", JOB, 3, 12, "png") == f"renders/prod/{JOB}/00003/000012.png"
    assert artifact_key("", JOB, 0, "000001-s42", "png") == f"{JOB}/00000/000001-s42.png"
    assert artifact_key("r", "job-7", 99_999, "frames", "mp4") == "r/job-7/99999/frames.mp4"
    assert manifest_key("renders", JOB) == f"renders/{JOB}/manifest.json"
    assert manifest_key("", "j1") == "j1/manifest.json"
    assert job_prefix("renders/", JOB) == f"renders/{JOB}"
    assert job_prefix("", JOB) == str(JOB)


def test_artifact_key_is_deterministic() -> None:
    first = [artifact_key("r", JOB, shard, item, "webp") for shard in range(3) for item in range(3)]
    again = [artifact_key("r", JOB, shard, item, "webp") for shard in range(3) for item in range(3)]
    assert first == again
    assert len(set(first)) == 9
    assert first == sorted(first)  # zero padding keeps the natural order


def test_reserved_top_level_folders() -> None:
    assert set(RESERVED_FOLDERS) == {"inputs", "models"}
    for folder in ("inputs", "inputs/sha256", "Models", "models/sd15/v1", "INPUTS/bulk"):
        with pytest.raises(InvalidKey, match=r"output_prefix: .* which the farm keeps for") as info:
            check_output_folder(folder)
        assert isinstance(info.value, ValueError) and not info.value.retryable
    with pytest.raises(InvalidKey, match=r"^name: 'inputs' would put outputs in 'inputs/'"):
        check_output_folder("inputs", "name")
    for folder in ("", "renders", "inputs-x", "team/inputs", "model", str(JOB)):
        assert check_output_folder(folder) == folder


def test_prefix_and_join() -> None:
    assert validate_prefix("") == ""
    assert validate_prefix("a/b") == "a/b"
    assert validate_prefix("a/b/") == "a/b"
    assert join_key("", "a/b", "", "c.png") == "a/b/c.png"
    assert validate_key("a/b.c/d_e-f") == "a/b.c/d_e-f"
    assert validate_part("x" * MAX_PART_LENGTH) == "x" * MAX_PART_LENGTH


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: artifact_key("../x", JOB, 0, 1, "png"), "prefix"),
        (lambda: artifact_key("/abs", JOB, 0, 1, "png"), "prefix"),
        (lambda: artifact_key("a//b", JOB, 0, 1, "png"), "prefix"),
        (lambda: artifact_key("ok", "../../etc", 0, 1, "png"), "job_id"),
        (lambda: artifact_key("ok", "a/b", 0, 1, "png"), "job_id"),
        (lambda: artifact_key("ok", "", 0, 1, "png"), "job_id"),
        (lambda: artifact_key("ok", JOB, -1, 1, "png"), "shard_index"),
        (lambda: artifact_key("ok", JOB, 100_000, 1, "png"), "shard_index"),
        (lambda: artifact_key("ok", JOB, True, 1, "png"), "shard_index"),
        (lambda: artifact_key("ok", JOB, "3", 1, "png"), "shard_index"),
        (lambda: artifact_key("ok", JOB, 0, "a/b", "png"), "item"),
        (lambda: artifact_key("ok", JOB, 0, "..", "png"), "item"),
        (lambda: artifact_key("ok", JOB, 0, -5, "png"), "item"),
        (lambda: artifact_key("ok", JOB, 0, "x" * 125, "png"), "item"),
        (lambda: artifact_key("ok", JOB, 0, 1, "exe"), "extension"),
        (lambda: artifact_key("ok", JOB, 0, 1, "png/../x"), "extension"),
        (lambda: manifest_key("a\\b", JOB), "prefix"),
        (lambda: validate_prefix("a//b"), "prefix"),
        (lambda: validate_prefix("a/b//"), "prefix"),
        (lambda: validate_part("a\nb", "name"), "name"),
        (lambda: validate_part(".", "name"), "name"),
        (lambda: validate_part("a..b", "name"), "name"),  # stricter than needed: no '..' anywhere
        (lambda: validate_part("x" * (MAX_PART_LENGTH + 1), "name"), "name"),
        (lambda: validate_key("a/./b"), "key"),
        (lambda: validate_key("/a"), "key"),
        (lambda: validate_key(""), "key"),
        (lambda: join_key(), "key"),
    ],
)
def test_bad_parts_name_the_field(call, field: str) -> None:
    with pytest.raises(InvalidKey, match=field) as info:
        call()
    error = info.value
    assert isinstance(error, FarmError) and isinstance(error, ValueError) and not error.retryable
    assert "\n" not in str(error) and "\x00" not in str(error)  # control characters are escaped


def _assert_safe(key: str) -> None:
    assert key and not key.startswith("/") and not key.endswith("/")
    segments = key.split("/")
    assert all(segments), "empty segment"
    assert ".." not in segments and "." not in segments
    assert all(not s.startswith(".") and len(s) <= MAX_PART_LENGTH for s in segments)
    assert all(ch.isascii() and ch.isprintable() and ch not in "\\ " for ch in key)
    assert validate_key(key) == key  # what builders make, stores accept


@given(st.lists(ANY_TEXT, min_size=1, max_size=4))
def test_join_key_is_safe_or_refuses(parts: list[str]) -> None:
    try:
        key = join_key(*parts)
    except InvalidKey:
        return
    _assert_safe(key)


@given(ANY_TEXT)
def test_validate_key_is_safe_or_refuses(text: str) -> None:
    try:
        key = validate_key(text)
    except InvalidKey:
        return
    _assert_safe(key)
    assert key == text


@given(
    prefix=ANY_TEXT,
    job=ANY_TEXT,
    shard=st.integers(min_value=-5, max_value=200_000),
    item=st.one_of(st.integers(min_value=-5, max_value=10**7), ANY_TEXT),
    ext=st.sampled_from(["png", "jpg", "mp4", "json", "exe", "", "png/..", "PNG"]),
)
def test_artifact_key_is_safe_or_refuses(prefix: str, job: str, shard: int, item: str | int, ext: str) -> None:
    try:
        key = artifact_key(prefix, job, shard, item, ext)
    except InvalidKey:
        return
    _assert_safe(key)
    assert key.endswith(f".{ext}")
    assert key == artifact_key(prefix, job, shard, item, ext)


@given(
    prefix=st.lists(VALID_PART, max_size=3).map("/".join),
    job=VALID_PART,
    shard=st.integers(min_value=0, max_value=99_999),
    item=st.one_of(st.integers(min_value=0, max_value=10**6), VALID_PART),
    ext=st.sampled_from(["png", "jpg", "webp", "mp4", "gif", "json", "jsonl"]),
)
def test_valid_parts_are_accepted_and_laid_out(prefix: str, job: str, shard: int, item: str | int, ext: str) -> None:
    key = artifact_key(prefix, job, shard, item, ext)
    _assert_safe(key)
    name = f"{item:06d}" if isinstance(item, int) else item
    expected = [*([prefix] if prefix else []), job, f"{shard:05d}", f"{name}.{ext}"]
    assert key == "/".join(expected)
    assert key.startswith(job_prefix(prefix, job) + "/")
    assert manifest_key(prefix, job) == job_prefix(prefix, job) + "/manifest.json"
