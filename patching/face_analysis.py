"""Face analysis for identity patches: insightface on an antelopev2-style pack, no downloads.

:class:`FaceAnalyzer` loads the pack's detector (SCRFD with 5 keypoints) and recognizer (ArcFace,
512-d) from a local folder, with ONNX Runtime providers chosen at run time (CUDA when
onnxruntime-gpu and a GPU are present, else CPU). :meth:`FaceAnalyzer.analyze` tries detector
sizes 640, 576, ..., 192 until a face is found and keeps the largest by box area; the raw
``embedding`` (not the normalised one) is what InstantID uses (reference ``patch_semantics.md``
2.1). :func:`keypoint_image` draws IdentityNet's keypoint image as upstream does: on the
reference's canvas (:func:`draw_keypoints`), then resized to the output size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patching.errors import PatchError

DETECTOR_SIZES = tuple(range(640, 191, -64))  # 640, 576, ..., 192
EXPECTED_FILES = (
    "a detector (SCRFD with keypoints, e.g. scrfd_10g_bnkps.onnx) and a recognizer "
    "(ArcFace 112x112 -> 512, e.g. glintr100.onnx): the antelopev2 pack's files"
)
KEYPOINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
NOSE = 2  # keypoint order: eye, eye, nose, mouth corner, mouth corner
LIMBS = (0, 1, 3, 4)  # each joined to the nose
DOT_RADIUS = 10  # pixels, on the canvas the keypoints were found in
LIMB_HALF_WIDTH = 4


class FaceModelsMissing(PatchError):
    """The face-analysis pack folder is missing or incomplete."""


class NoFaceFound(PatchError):
    """No face in an image at any detector size."""


@dataclass(frozen=True)
class DetectedFace:
    embedding: Any  # numpy (512,) raw ArcFace embedding
    keypoints: Any  # numpy (5, 2): eyes, nose, mouth corners
    bbox: tuple[float, float, float, float]
    score: float
    detector_size: int

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def choose_providers(preference: str = "auto") -> list[str]:
    """ONNX Runtime providers: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    cuda = "CUDAExecutionProvider" in available and _gpu_visible()
    if preference == "cpu" or (preference == "auto" and not cuda):
        return ["CPUExecutionProvider"]
    if preference in ("auto", "cuda") and cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference == "cuda":
        raise PatchError("CUDA was requested for face analysis but onnxruntime has no CUDA provider or GPU")
    raise PatchError(f"providers {preference!r}: expected auto, cpu or cuda")


def _gpu_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def largest_face(faces: list[DetectedFace]) -> DetectedFace:
    """The face with the largest box area (width x height, not the upstream typo w*y2 - y1)."""
    return max(faces, key=lambda face: face.area)


class FaceAnalyzer:
    """A loaded detector + recognizer pack; one per worker process (pin it)."""

    def __init__(self, pack_dir: str | Path, providers: str = "auto") -> None:
        folder = Path(pack_dir).expanduser()
        if not folder.is_dir():
            raise FaceModelsMissing(f"face models folder {folder} does not exist; it must hold {EXPECTED_FILES}")
        if not any(folder.glob("*.onnx")):
            raise FaceModelsMissing(f"face models folder {folder} has no .onnx files; it must hold {EXPECTED_FILES}")
        from insightface.app import FaceAnalysis

        self.folder = folder
        self.providers = choose_providers(providers)
        try:
            self.app = FaceAnalysis(
                name=str(folder.resolve()), providers=self.providers, allowed_modules=["detection", "recognition"]
            )
        except AssertionError:
            raise FaceModelsMissing(
                f"face models folder {folder} has no usable detector; it must hold {EXPECTED_FILES}"
            ) from None
        if "recognition" not in self.app.models:
            raise FaceModelsMissing(f"face models folder {folder} has no recognizer; it must hold {EXPECTED_FILES}")
        self._size: int | None = None
        self._ctx = 0 if self.providers[0] == "CUDAExecutionProvider" else -1

    def analyze(self, image: Any) -> DetectedFace | None:
        """The largest face of a PIL image, trying each detector size; ``None`` if none."""
        import numpy as np

        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        for size in DETECTOR_SIZES:
            if self._size != size:
                self.app.prepare(ctx_id=self._ctx, det_size=(size, size))
                self._size = size
            faces = self.app.get(bgr)
            if faces:
                found = [
                    DetectedFace(f.embedding, f.kps, tuple(float(v) for v in f.bbox), float(f.det_score), size)
                    for f in faces
                ]
                return largest_face(found)
        return None

    def embed(self, images: list[Any], labels: list[str]) -> tuple[Any, list[DetectedFace]]:
        """Raw embeddings ``(N, 512)`` (torch, float32) and the faces; :class:`NoFaceFound`
        naming the first image without one."""
        import numpy as np
        import torch

        faces = []
        for image, label in zip(images, labels, strict=True):
            face = self.analyze(image)
            if face is None:
                sizes = f"{DETECTOR_SIZES[0]} down to {DETECTOR_SIZES[-1]}"
                raise NoFaceFound(f"{label}: no face detected (detector sizes {sizes})")
            faces.append(face)
        stacked = np.stack([np.asarray(f.embedding, dtype=np.float32) for f in faces])
        return torch.from_numpy(stacked), faces


def draw_keypoints(size: tuple[int, int], keypoints: Any) -> Any:
    """IdentityNet's control image on a ``size`` canvas, drawn as upstream's ``draw_kps`` does
    (reference ``patch_semantics.md`` 2.8) with its integer geometry: on black, four limbs from
    the eyes and mouth corners to the nose, each a filled ellipse centred at the segment's
    truncated midpoint with half-axes ``int(length / 2)`` and :data:`LIMB_HALF_WIDTH`, turned by the
    truncated angle in whole degrees, outlined by one rounded vertex per degree, in the first
    point's colour; everything dimmed to 60% (truncated); then a full-colour disc of radius
    :data:`DOT_RADIUS` (the pixels within that distance of the truncated keypoint) on each of the
    5 keypoints. Marks have these pixel sizes on *this* canvas: draw on the canvas the keypoints
    were detected in and resize (:func:`keypoint_image`)."""
    from PIL import Image, ImageDraw

    points = [(float(x), float(y)) for x, y in keypoints]
    canvas = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for start in LIMBS:
        outline = _limb_outline(points[start], points[NOSE])
        draw.polygon(outline, fill=KEYPOINT_COLOURS[start])
        draw.line([*outline, outline[0]], fill=KEYPOINT_COLOURS[start])  # the edge pixels too
    canvas = Image.eval(canvas, lambda v: int(v * 0.6))
    draw = ImageDraw.Draw(canvas)
    for (x, y), colour in zip(points, KEYPOINT_COLOURS, strict=True):
        cx, cy = int(x), int(y)
        for dy in range(-DOT_RADIUS, DOT_RADIUS + 1):  # one row of the disc x^2 + y^2 <= r^2 per line
            half = math.isqrt(DOT_RADIUS * DOT_RADIUS - dy * dy)
            draw.rectangle((cx - half, cy + dy, cx + half, cy + dy), fill=colour)
    return canvas


def _limb_outline(start: tuple[float, float], end: tuple[float, float]) -> list[tuple[int, int]]:
    """The polygon of one limb: an ellipse around the segment ``start``-``end``, one vertex per
    degree rounded to whole pixels (repeated vertices dropped)."""
    (x0, y0), (x1, y1) = start, end
    cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
    half_length = int(math.hypot(x0 - x1, y0 - y1) / 2)
    turn = math.radians(int(math.degrees(math.atan2(y0 - y1, x0 - x1))))
    cos_turn, sin_turn = math.cos(turn), math.sin(turn)
    outline: list[tuple[int, int]] = []
    for degree in range(361):
        t = math.radians(degree)
        ex, ey = half_length * math.cos(t), LIMB_HALF_WIDTH * math.sin(t)
        vertex = (round(cx + ex * cos_turn - ey * sin_turn), round(cy + ex * sin_turn + ey * cos_turn))
        if not outline or outline[-1] != vertex:
            outline.append(vertex)
    return outline


def keypoint_image(keypoints: Any, source_size: tuple[int, int], output_size: tuple[int, int]) -> Any:
    """IdentityNet's control image for an output of ``output_size`` (width, height) from
    keypoints found in an image of ``source_size``: drawn on the source's own canvas
    (:func:`draw_keypoints`), then resized to the output, as upstream does (its drawing is made on
    the face image and the ControlNet pipeline resizes it). The resize is PIL's Lanczos stretch,
    the filter diffusers' control image processor uses, so handing the pipeline this image or
    the source-size drawing gives the same pixels; marks scale with the image, like the face."""
    from PIL import Image

    width, height = int(source_size[0]), int(source_size[1])
    if width < 1 or height < 1:
        raise PatchError(f"keypoint source size {source_size}: need a positive width and height")
    canvas = draw_keypoints((width, height), keypoints)
    if canvas.size == tuple(output_size):
        return canvas
    return canvas.resize(tuple(int(v) for v in output_size), Image.Resampling.LANCZOS)
