"""Messages about input images name the user's file as the spec gave it, where a relative path was
looked for, and (once uploaded) the object key after it. Real files and a real local store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from farm.inputs import ImageRef, InputImageError, describe, load_image, upload_inputs
from farm.specs import SpecError, parse_spec
from storage.objects.local import LocalStore


def _png(path: Path) -> Path:
    Image.new("RGB", (32, 32), (10, 120, 200)).save(path)
    return path


def _video(images: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "temporal_video", "model": "/m/svd", "family": "svd", "images": images, "seeds": [1]}


def test_an_uploaded_reference_keeps_the_file_as_given(tmp_path: Path) -> None:
    _png(tmp_path / "start frame.png")
    store = LocalStore(tmp_path / "store")
    out = upload_inputs(_video([{"path": "start frame.png"}]), store, tmp_path)
    ref = parse_spec(out).images[0]
    assert ref.name == "start frame.png" and ref.key.startswith("inputs/sha256/")
    assert describe("images[0]", ref) == f"images[0] 'start frame.png' ({ref.key})"
    assert describe("images[0]", ImageRef(key="inputs/a.png")) == "images[0] (inputs/a.png)"


def test_a_missing_file_says_where_a_relative_path_was_looked_for(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(InputImageError) as info:
        upload_inputs(_video([{"path": "frames/start.png"}]), store, tmp_path)
    assert str(info.value) == (
        f"spec.images[0] 'frames/start.png': {tmp_path / 'frames' / 'start.png'} does not exist "
        f"(a relative path is resolved against {tmp_path})"
    )
    with pytest.raises(InputImageError, match=r"'~/no-such-farm-input.png': .* does not exist \(~ is "):
        upload_inputs(_video([{"path": "~/no-such-farm-input.png"}]), store, tmp_path)


def test_a_bad_file_is_named_as_the_spec_gave_it(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputImageError, match=r"^spec\.images\[0\] 'notes\.png': not an image"):
        upload_inputs(_video([{"path": "notes.png"}]), LocalStore(tmp_path / "store"), tmp_path)


def test_a_worker_side_error_names_the_file_then_the_key(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _png(tmp_path / "face.png")
    ref = ImageRef.model_validate(upload_inputs({"path": "face.png"}, store, tmp_path))
    assert load_image(store, ref, "images[0]").size == (32, 32)
    store.put_bytes(ref.key, b"overwritten")  # the object changed after submit
    with pytest.raises(InputImageError) as info:
        load_image(store, ref, "identity.references[0]")
    assert str(info.value) == (
        f"identity.references[0] 'face.png' ({ref.key}): the stored object does not match its sha256 "
        "(changed since submit)"
    )
    gone = ImageRef(key="inputs/sha256/gone.png", name="./gone.png")
    with pytest.raises(InputImageError, match=r"^images\[1\] './gone.png' \(inputs/sha256/gone.png\): not in the"):
        load_image(store, gone, "images[1]")
    store.put_bytes("inputs/text.png", b"plain text")
    with pytest.raises(InputImageError, match=r"^images\[2\] 'scan.png' \(inputs/text.png\): not an image"):
        load_image(store, ImageRef(key="inputs/text.png", name="scan.png"), "images[2]")


def test_a_name_with_control_characters_is_refused_in_a_spec() -> None:
    with pytest.raises(SpecError, match=r"images\[0\]\.name: .*control characters"):
        parse_spec(_video([{"key": "inputs/a.png", "name": "a\x1b[31m.png"}]))


def test_a_long_or_odd_path_is_kept_short_and_printable(tmp_path: Path) -> None:
    odd = "x\x07" + "y" * 400 + ".png"
    with pytest.raises(InputImageError) as info:
        upload_inputs(_video([{"path": odd}]), LocalStore(tmp_path / "store"), tmp_path)
    label = str(info.value).split(": ", 1)[0]
    assert "\x07" not in label and "..." in label and len(label) < 260
