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


# A face in a 640x480 photo (SCRFD order: eyes, nose, mouth corners) and one twice as large.
PHOTO_KEYPOINTS = [(271.3, 201.7), (372.9, 198.2), (322.4, 262.6), (281.1, 318.4), (362.8, 315.9)]


def _control_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """What diffusers' ControlNet pipelines feed the ControlNet: their control image processor
    (RGB, Lanczos resize to the output, 0..1), as 0..255."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    tensor = processor.preprocess(image, height=height, width=width)[0]
    return (tensor.permute(1, 2, 0).numpy() * 255).round().astype(int)


def test_keypoints_are_drawn_like_upstream_on_the_reference_canvas() -> None:
    pytest.importorskip("cv2")
    from tests.fixtures.keypoints import opencv_keypoint_drawing

    for size, scale in (((640, 480), 1.0), ((1280, 960), 2.0)):
        keypoints = [(x * scale, y * scale) for x, y in PHOTO_KEYPOINTS]
        ours = np.asarray(draw_keypoints(size, keypoints)).astype(int)
        theirs = np.asarray(opencv_keypoint_drawing(size, keypoints)).astype(int)
        lit, differing = (theirs.max(-1) > 0).sum(), (np.abs(ours - theirs).max(-1) > 0).sum()
        print(f"{size}: {differing} of {lit} lit pixels differ from the OpenCV drawing")
        # Same discs and limb outlines; only the fill of the (rounded, not quite convex) limb
        # outline differs from cv2.fillConvexPoly at a few edge pixels of long limbs.
        assert differing <= 0.01 * lit


@pytest.mark.parametrize(("source", "output"), [((640, 480), (64, 64)), ((1280, 960), (96, 64))])
def test_keypoint_image_at_another_output_size_is_the_resized_reference_drawing(
    source: tuple[int, int], output: tuple[int, int]
) -> None:
    pytest.importorskip("cv2")
    pytest.importorskip("diffusers")
    from patching.face_analysis import keypoint_image
    from tests.fixtures.keypoints import opencv_keypoint_drawing

    scale = source[0] / 640
    keypoints = [(x * scale, y * scale) for x, y in PHOTO_KEYPOINTS]
    image = keypoint_image(keypoints, source, output)
    assert image.size == output
    ours = _control_pixels(image, *output)
    # What upstream hands the pipeline: its drawing on the photo's canvas, resized by diffusers.
    expected = _control_pixels(opencv_keypoint_drawing(source, keypoints), *output)
    # What the project did before: fixed-size marks drawn on the output canvas.
    sx, sy = output[0] / source[0], output[1] / source[1]
    before = _control_pixels(draw_keypoints(output, [(x * sx, y * sy) for x, y in keypoints]), *output)
    count = output[0] * output[1]
    differing, worst = (np.abs(ours - expected).max(-1) > 0).sum(), np.abs(ours - expected).max()
    was = (np.abs(before - expected).max(-1) > 0).sum()
    print(f"{source}->{output}: {differing} of {count} pixels differ (max {worst}/255); before: {was}")
    assert differing <= 0.01 * count and worst <= 16
    assert was > 0.1 * count
