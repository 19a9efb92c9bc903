"""Face analysis with insightface on a tiny ONNX pack built in the fixture (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("insightface")

from farm.tiny_components import build_tiny_face_pack
from patching.face_analysis import (
    DETECTOR_SIZES,
    DetectedFace,
    FaceAnalyzer,
    FaceModelsMissing,
    NoFaceFound,
    choose_providers,
    draw_keypoints,
    largest_face,
)


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> FaceAnalyzer:
    return FaceAnalyzer(build_tiny_face_pack(tmp_path_factory.mktemp("faces") / "antelopev2"))


def face_image() -> Image.Image:
    pixels = np.full((200, 200, 3), 128, np.uint8)
    pixels[60:140, 70:130] = 20
    pixels[80:90, 80:90] = 250
    return Image.fromarray(pixels)


def fine_texture() -> Image.Image:
    """Too smooth per detector cell at 640; found once the image is scaled down enough."""
    wave = 127.5 + 128 * 0.3 * np.sin(2 * np.pi * np.arange(600) / 40)
    return Image.fromarray(np.repeat(np.tile(wave, (600, 1))[:, :, None], 3, axis=2).astype(np.uint8))


def test_detects_the_largest_face_with_a_raw_embedding(analyzer: FaceAnalyzer) -> None:
    face = analyzer.analyze(face_image())
    assert face is not None and face.detector_size == 640
    assert face.embedding.shape == (512,) and face.keypoints.shape == (5, 2)
    assert abs(float(np.linalg.norm(face.embedding)) - 1.0) > 1e-3  # raw, not normed_embedding
    embeds, _ = analyzer.embed([face_image(), face_image()], ["a", "b"])
    assert tuple(embeds.shape) == (2, 512) and np.allclose(embeds[0].numpy(), face.embedding)


def test_falls_back_to_smaller_detector_sizes(analyzer: FaceAnalyzer) -> None:
    face = analyzer.analyze(fine_texture())
    assert face is not None
    assert DETECTOR_SIZES[-1] <= face.detector_size < 640


def test_no_face_is_a_clear_error_naming_the_image(analyzer: FaceAnalyzer) -> None:
    flat = Image.new("RGB", (120, 90), (128, 128, 128))
    assert analyzer.analyze(flat) is None
    with pytest.raises(NoFaceFound, match=r"identity\.references\[1\] \(inputs/x\.png\): no face detected"):
        analyzer.embed([face_image(), flat], ["identity.references[0]", "identity.references[1] (inputs/x.png)"])
    assert isinstance(NoFaceFound("x"), ValueError)


def test_largest_face_uses_width_times_height() -> None:
    tall = DetectedFace(None, None, (0.0, 100.0, 10.0, 200.0), 0.9, 640)  # 10 x 100 = 1000
    wide = DetectedFace(None, None, (0.0, 0.0, 40.0, 30.0), 0.9, 640)  # 40 x 30 = 1200
    assert largest_face([tall, wide]) is wide  # the upstream typo w*y2 - y1 would pick tall (1900)


def test_missing_or_incomplete_packs_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FaceModelsMissing, match=r"antelopev2 does not exist; it must hold a detector"):
        FaceAnalyzer(tmp_path / "antelopev2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FaceModelsMissing, match=r"has no \.onnx files"):
        FaceAnalyzer(tmp_path / "empty")
    pack = build_tiny_face_pack(tmp_path / "partial")
    (pack / "scrfd_10g_bnkps.onnx").unlink()
    with pytest.raises(FaceModelsMissing, match="has no usable detector"):
        FaceAnalyzer(pack)


def test_providers_are_chosen_at_run_time() -> None:
    import onnxruntime

    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert choose_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="no CUDA provider"):
            choose_providers("cuda")


def test_keypoint_image() -> None:
    kps = [(30, 40), (70, 40), (50, 60), (35, 80), (65, 80)]
    image = draw_keypoints((100, 120), kps)
    assert image.size == (100, 120) and image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((30, 40)) == (255, 0, 0) and image.getpixel((50, 60)) == (0, 0, 255)
    limb = image.getpixel((40, 50))  # halfway from the first eye to the nose, outside both dots
    assert limb == (153, 0, 0)  # the eye's red at 60%
