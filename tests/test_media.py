"""farm.media: mp4 / GIF / PNG encoding of rendered frames, with the ffmpeg that imageio-ffmpeg ships."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm.media import VideoInfo, decode_png, encode_frame_png, encode_gif, encode_mp4, probe_video

ROOT = Path(__file__).resolve().parents[1]


def gradient_frames(count: int, width: int = 64, height: int = 48) -> list[Image.Image]:
    """Distinct frames: a horizontal gradient whose colour shifts from frame to frame."""
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    frames = []
    for i in range(count):
        shift = 255.0 * i / max(1, count)
        rgb = np.stack([ramp, np.full_like(ramp, shift), 255 - ramp], axis=-1)
        frames.append(Image.fromarray(rgb.astype(np.uint8), "RGB"))
    return frames


def decode_rgb(data: bytes) -> list[np.ndarray]:
    """Every frame of a video as an (H, W, 3) uint8 array."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "v.mp4")
        Path(path).write_bytes(data)
        reader = imageio_ffmpeg.read_frames(path)
        try:
            width, height = next(reader)["size"]
            return [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
        finally:
            reader.close()


def gif_durations(data: bytes) -> tuple[Image.Image, list[int]]:
    image = Image.open(io.BytesIO(data))
    durations = []
    for index in range(image.n_frames):
        image.seek(index)
        durations.append(image.info["duration"])
    image.seek(0)
    return image, durations


# --- mp4 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(64, 48), (50, 30)])
def test_mp4_round_trip(width: int, height: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = encode_mp4(gradient_frames(7, width, height), fps=7)
    assert data[4:8] == b"ftyp"
    info = probe_video(data)
    # 50x30 is not a multiple of 16: imageio-ffmpeg's default macro_block_size would have rescaled it to 64x32.
    assert info == VideoInfo(frames=7, width=width, height=height, fps=pytest.approx(7.0, abs=0.01), codec="h264")
    assert data.index(b"moov") < data.index(b"mdat"), "+faststart puts the index before the media data"
    assert list(tmp_path.iterdir()) == [], "temporary files are cleaned up"


def test_mp4_odd_size_is_padded_with_edge_pixels() -> None:
    frame = np.zeros((47, 63, 3), np.uint8)
    frame[:, :, 0] = 220  # red everywhere ...
    frame[:, 56:] = (20, 20, 230)  # ... but blue at the right edge
    frames = [Image.fromarray(frame, "RGB")] * 3
    data = encode_mp4(frames, fps=12)
    info = probe_video(data)
    assert (info.width, info.height, info.frames) == (64, 48, 3)
    decoded = decode_rgb(data)[0].astype(int)
    padded_column, last_column = decoded[:, 63], decoded[:, 62]
    assert np.abs(padded_column - last_column).mean() < 12, "the padding replicates the last column"
    assert padded_column[:, 2].mean() > 180 and padded_column[:, 0].mean() < 70, "padded column is blue, not black"
    assert decoded[47, :50, 0].mean() > 180, "the padded bottom row is red like the row above"


def test_mp4_content_survives_encoding() -> None:
    red = np.zeros((48, 64, 3), np.uint8)
    red[:] = (230, 20, 20)
    red[:8, :8] = (0, 0, 0)  # mostly red
    data = encode_mp4([Image.fromarray(red, "RGB")] * 2, fps=24, crf=23)
    frames = decode_rgb(data)
    assert len(frames) == 2
    r, g, b = frames[0].reshape(-1, 3).astype(int).mean(axis=0)
    assert r > 180 and g < 60 and b < 60


def test_mp4_accepts_non_rgb_modes_consistently() -> None:
    frames = [Image.new("L", (32, 32), 128)] * 2
    assert probe_video(encode_mp4(frames, fps=2)).frames == 2


def test_mixed_sizes_name_the_frame() -> None:
    frames = gradient_frames(4)
    frames[2] = frames[2].resize((32, 24))
    with pytest.raises(ValueError, match="frame 2"):
        encode_mp4(frames, fps=8)
    with pytest.raises(ValueError, match="frame 2"):
        encode_gif(frames, fps=8)


def test_mixed_modes_name_the_frame() -> None:
    frames = gradient_frames(3)
    frames[1] = frames[1].convert("RGBA")
    with pytest.raises(ValueError, match="frame 1"):
        encode_mp4(frames, fps=8)


def test_no_frames() -> None:
    with pytest.raises(ValueError, match="no frames"):
        encode_mp4([], fps=8)
    with pytest.raises(ValueError, match="no frames"):
        encode_gif([], fps=8)


@pytest.mark.parametrize("fps", [0, -1, 240.5, math.nan, math.inf])
def test_bad_fps(fps: float) -> None:
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(gradient_frames(1), fps=fps)
    with pytest.raises(ValueError, match="fps"):
        encode_gif(gradient_frames(1), fps=fps)


def test_bad_crf() -> None:
    with pytest.raises(ValueError, match="crf"):
        encode_mp4(gradient_frames(1), fps=8, crf=52)


def test_probe_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a decodable video"):
        probe_video(b"this is not a video" * 20)
    with pytest.raises(ValueError):
        probe_video(b"")


# --- GIF -------------------------------------------------------------------------------------------


def test_gif_frames_loop_and_duration() -> None:
    data = encode_gif(gradient_frames(5), fps=8)
    image, durations = gif_durations(data)
    assert image.format == "GIF"
    assert image.n_frames == 5
    assert image.info["loop"] == 0
    assert image.size == (64, 48)
    assert all(abs(d - 1000 / 8) <= 10 for d in durations)


def test_gif_is_downscaled_keeping_aspect() -> None:
    data = encode_gif(gradient_frames(2, width=640, height=480), fps=4, max_side=100)
    image, _ = gif_durations(data)
    assert image.size == (100, 75)


def test_gif_subsampling_keeps_playback_time() -> None:
    fps, count = 10, 50
    data = encode_gif(gradient_frames(count), fps=fps, max_frames=12)
    image, durations = gif_durations(data)
    assert image.n_frames == 12
    assert abs(sum(durations) - 1000 * count / fps) <= 10
    assert all(abs(d - 1000 * count / fps / 12) <= 10 for d in durations)


def test_gif_high_fps_keeps_delays_playable() -> None:
    data = encode_gif(gradient_frames(60), fps=60)
    _, durations = gif_durations(data)
    assert min(durations) >= 20, "browsers slow down GIF delays under 20 ms"
    assert abs(sum(durations) - 1000) <= 10


# --- PNG and import hygiene --------------------------------------------------------------------------


def test_png_round_trip() -> None:
    frame = gradient_frames(1)[0]
    data = encode_frame_png(frame)
    assert data.startswith(b"\x89PNG")
    decoded = decode_png(data)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(frame))
    with pytest.raises(ValueError):
        decode_png(b"not a png")


def test_import_is_light() -> None:
    code = (
        "import sys, farm.media\n"
        "print(','.join(m for m in ('numpy', 'PIL', 'torch', 'imageio_ffmpeg') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == ""
