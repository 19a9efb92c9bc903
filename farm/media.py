"""Encode rendered video frames (equal-size PIL images) into deliverables: H.264 mp4, GIF previews, PNG frames,
and the rows of a video job's contact sheet (:func:`clip_rows`: one row of sampled frames per clip).

The mp4 is written by the ffmpeg binary that ``imageio-ffmpeg`` ships, so no system ffmpeg is needed.
Importing this module has no side effects and loads neither PIL, numpy nor imageio-ffmpeg; they are
imported by the functions that need them.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import subprocess
import tempfile
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ClipRow",
    "FfmpegFailed",
    "VideoInfo",
    "clip_rows",
    "decode_png",
    "encode_frame_png",
    "encode_gif",
    "encode_mp4",
    "probe_video",
    "sample_frames",
    "stream_mp4",
]

MAX_FPS = 240.0
_GIF_TICK_MS = 10  # GIF frame delays are stored in hundredths of a second
_GIF_MIN_DELAY_MS = 20  # browsers play shorter delays as 100 ms
SHEET_FRAMES = 8  # frames shown per clip on a contact sheet
SHEET_FRAME_HEIGHT = 112
CLIP_GAP = 22  # between two clips' rows on a contact sheet (a rule runs through it)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` found by decoding a video."""

    frames: int
    width: int
    height: int
    fps: float
    codec: str | None


def _check_fps(fps: float) -> float:
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps):
        raise ValueError(f"fps must be a number, got {fps!r}")
    if not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be > 0 and <= {MAX_FPS:g}, got {fps:g}")
    return float(fps)


def _check_frames(frames: Sequence[Image.Image]) -> tuple[tuple[int, int], str]:
    """Size and mode shared by all frames; ValueError naming the first frame that differs."""
    if len(frames) == 0:
        raise ValueError("no frames to encode")
    size, mode = frames[0].size, frames[0].mode
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"frame 0 is empty ({size[0]}x{size[1]})")
    for index, frame in enumerate(frames):
        if frame.size != size or frame.mode != mode:
            raise ValueError(
                f"frame {index} is {frame.size[0]}x{frame.size[1]} {frame.mode}, "
                f"expected {size[0]}x{size[1]} {mode} like frame 0"
            )
    return size, mode


def _pad_even(image: Image.Image) -> Image.Image:
    """Grow an RGB image to even width and height by replicating its last column and row."""
    from PIL import Image

    width, height = image.size
    padded_w, padded_h = width + width % 2, height + height % 2
    if (padded_w, padded_h) == (width, height):
        return image
    padded = Image.new(image.mode, (padded_w, padded_h))
    padded.paste(image, (0, 0))
    if padded_w > width:
        padded.paste(image.crop((width - 1, 0, width, height)), (width, 0))
    if padded_h > height:
        padded.paste(padded.crop((0, height - 1, padded_w, height)), (0, height))
    return padded


class FfmpegFailed(RuntimeError):
    """ffmpeg exited with an error: the message holds its exit code and the end of its stderr."""


STDERR_SHOWN = 600  # characters of ffmpeg's stderr (its first lines: the cause) kept in an error message


def encode_mp4(frames: Sequence[Image.Image], fps: float, *, crf: int = 18) -> bytes:
    """H.264 mp4 (yuv420p, moov atom first for streaming); odd sizes are padded by one edge pixel."""
    size, _ = _check_frames(frames)
    return stream_mp4(frames, size, fps, crf=crf)


def stream_mp4(frames: Iterable[Image.Image], size: tuple[int, int], fps: float, *, crf: int = 18) -> bytes:
    """H.264 mp4 (yuv420p, moov atom first) of ``frames`` (each ``size``), piped one at a time into
    the stdin of the ffmpeg that imageio-ffmpeg ships, so a long video never sits in memory as
    frames; odd sizes are padded by one edge pixel. :class:`FfmpegFailed` (exit code and stderr)
    when ffmpeg fails; ``ValueError`` for no frames or a frame of another size. An exception the
    ``frames`` iterator raises stops ffmpeg and is raised as it is."""
    import imageio_ffmpeg

    fps = _check_fps(fps)
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an int in 0..51, got {crf!r}")
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"frames are empty ({width}x{height})")
    padded = (width + width % 2, height + height % 2)
    with tempfile.TemporaryDirectory(prefix="farm-media-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{padded[0]}x{padded[1]}", "-r", f"{fps:g}", "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-movflags", "+faststart", path,
        ]  # fmt: skip
        with open(os.path.join(tmp, "ffmpeg.log"), "w+b") as log:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
            assert process.stdin is not None
            count = 0
            try:
                for index, frame in enumerate(frames):
                    if frame.size != size:
                        raise ValueError(
                            f"frame {index} is {frame.size[0]}x{frame.size[1]}, expected {width}x{height} like frame 0"
                        )
                    process.stdin.write(_pad_even(frame.convert("RGB")).tobytes())
                    count += 1
                process.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg stopped reading: its exit code and stderr say why
            except BaseException:
                process.kill()
                process.wait()
                raise
            code = process.wait()
            log.seek(0)
            stderr = log.read().decode("utf-8", "replace").strip()
        if count == 0:
            raise ValueError("no frames to encode")
        if code != 0:
            shown = " | ".join(line.strip() for line in stderr.splitlines() if line.strip())[:STDERR_SHOWN]
            raise FfmpegFailed(f"ffmpeg exited with code {code}: {shown or '(nothing on stderr)'}")
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise FfmpegFailed(f"ffmpeg exited with code 0 but wrote no mp4: {stderr[:STDERR_SHOWN]}")
        with open(path, "rb") as fh:
            return fh.read()


def _gif_delays(frame_count: int, fps: float, shown: int) -> list[int]:
    """Per-frame delays in ms (multiples of 10) for `shown` frames that together last frame_count / fps."""
    total_ms = 1000.0 * frame_count / fps
    edges = [round(total_ms * i / shown / _GIF_TICK_MS) * _GIF_TICK_MS for i in range(shown + 1)]
    return [max(_GIF_TICK_MS, b - a) for a, b in itertools.pairwise(edges)]


def encode_gif(frames: Sequence[Image.Image], fps: float, *, max_side: int = 256, max_frames: int = 120) -> bytes:
    """A looping GIF preview: frames shrunk to fit max_side, at most max_frames of them, same playback time."""
    from PIL import Image

    fps = _check_fps(fps)
    if max_side < 1 or max_frames < 1:
        raise ValueError("max_side and max_frames must be >= 1")
    (width, height), _ = _check_frames(frames)
    count = len(frames)
    # Keep each frame's delay >= 20 ms as well: browsers slow shorter delays down to 100 ms.
    shown = max(1, min(count, max_frames, math.floor(1000.0 * count / fps / _GIF_MIN_DELAY_MS)))
    picked = [frames[i * count // shown] for i in range(shown)]
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def prepare(frame: Image.Image) -> Image.Image:
        frame = frame.convert("RGB")
        return frame if frame.size == size else frame.resize(size, Image.Resampling.LANCZOS)

    images = [prepare(frame) for frame in picked]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=_gif_delays(count, fps, shown),
        loop=0,
        disposal=1,
        optimize=False,
    )
    return buf.getvalue()


def _decoded_frames(data: bytes) -> Generator[dict | bytes, None, None]:
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="farm-media-") as tmp:
        path = os.path.join(tmp, "video")
        with open(path, "wb") as fh:
            fh.write(data)
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="gray", bits_per_pixel=8)
        try:
            yield from reader
        finally:
            reader.close()


def probe_video(data: bytes) -> VideoInfo:
    """Decode a whole video and report its frame count, size, fps and codec; ValueError if it does not decode."""
    if not data:
        raise ValueError("no video data")
    frames = _decoded_frames(data)
    try:
        meta = next(frames)
        assert isinstance(meta, dict)
        count = sum(1 for _ in frames)
    except (OSError, RuntimeError, IndexError, KeyError, AttributeError, StopIteration) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"not a decodable video: {first_line}") from exc
    finally:
        frames.close()
    width, height = meta["size"]
    fps = float(meta.get("fps") or 0.0)
    if not fps and count and meta.get("duration"):
        fps = count / float(meta["duration"])
    return VideoInfo(frames=count, width=int(width), height=int(height), fps=fps, codec=meta.get("codec") or None)


def decode_png(data: bytes) -> Image.Image:
    """A PNG as a fully loaded RGB image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"expected a PNG, got {image.format}")
            image.load()
            return image.convert("RGB")
    except OSError as exc:  # includes PIL.UnidentifiedImageError
        raise ValueError(f"not a PNG image: {exc}") from exc


def encode_frame_png(image: Image.Image) -> bytes:
    """One frame as a plain PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def sample_frames(count: int, shown: int = SHEET_FRAMES) -> list[int]:
    """Indexes of ``shown`` frames spread evenly over ``count`` (the first and last included)."""
    if count <= 0:
        return []
    if count <= shown:
        return list(range(count))
    if shown == 1:
        return [0]
    return sorted({round(i * (count - 1) / (shown - 1)) for i in range(shown)})


@dataclass(frozen=True)
class ClipRow:
    """One clip on a contact sheet: its caption, its sampled ``(label, image)`` frames (the label,
    e.g. ``f7``, goes under the frame), and ``note`` saying why there are none (a failed clip)."""

    caption: str
    frames: Sequence[tuple[str, Image.Image]]
    note: str = "no frames"


def clip_rows(clips: Sequence[ClipRow], frames_per_row: int = SHEET_FRAMES) -> Image.Image:
    """The body of a video contact sheet: per clip, its caption over a strip of its frames, each
    numbered below; a gap with a rule between clips."""
    from PIL import Image, ImageDraw

    from farm import sheets

    first = next((image for clip in clips for _, image in clip.frames), None)
    aspect = first.width / first.height if first is not None else 16 / 9
    box = (max(64, min(224, round(SHEET_FRAME_HEIGHT * aspect))), SHEET_FRAME_HEIGHT)
    step = box[0] + 4
    width = max(frames_per_row * step - 4, sheets.MIN_WIDTH - 2 * sheets.PAD)
    caption_h, number_h = sheets.line_height(sheets.TEXT_SIZE), sheets.line_height(sheets.SMALL_SIZE)
    row_h = caption_h + 4 + box[1] + 2 + number_h
    height = len(clips) * row_h + max(0, len(clips) - 1) * CLIP_GAP
    canvas = Image.new("RGB", (width, max(1, height)), sheets.BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    small = sheets.font(sheets.SMALL_SIZE)
    for r, clip in enumerate(clips):
        top = r * (row_h + CLIP_GAP)
        if r:
            rule = top - CLIP_GAP // 2
            draw.line((0, rule, width - 1, rule), fill=sheets.RULE, width=2)
        caption = sheets.fit(clip.caption, sheets.TEXT_SIZE, width)
        draw.text((0, top), caption, fill=sheets.INK, font=sheets.font(sheets.TEXT_SIZE))
        strip = top + caption_h + 4
        if not clip.frames:
            canvas.paste(sheets.placeholder((min(width, 2 * step - 4), box[1]), clip.note), (0, strip))
            continue
        for i, (label, image) in enumerate(clip.frames[:frames_per_row]):
            sheets.paste_centered(canvas, sheets.fit_image(image, box), (i * step, strip, box[0], box[1]))
            draw.text(
                (i * step, strip + box[1] + 2),
                sheets.fit(label, sheets.SMALL_SIZE, box[0]),
                fill=sheets.MUTED,
                font=small,
            )
    return canvas
