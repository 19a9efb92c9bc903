"""Running ``encode`` shards: the source job's frames, read and checked one at a time, piped into
ffmpeg (:func:`farm.media.stream_mp4`), one mp4 per video, beside the source's outputs.

A video source's frames (PNG outputs recording a ``frame``) make one video per clip (per item:
image and seed), in frame order, named after the clip (``000003-s42.mp4``); a source of stills
makes one video of every still in item order (``stills.mp4``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from farm.kinds.base import item_name
from farm.media import FfmpegFailed, probe_video, stream_mp4
from farm.worker.shard_run import ShardRun
from farm.worker.step_inputs import (
    SourceOutput,
    StepInputError,
    StepOutputs,
    decode_image,
    lineage_params,
    read_input,
    source_images,
)
from storage.objects.keys import artifact_key

if TYPE_CHECKING:
    from farm.kinds.encode import EncodeSpec

STILLS = "stills"  # the name of the one video of a source of stills


def video_groups(images: list[SourceOutput]) -> list[tuple[str, list[SourceOutput]]]:
    """``(name, frames in order)`` per video: a clip's frames by item, or every still at once."""
    frames = [image for image in images if "frame" in image.params]
    if not frames:
        return [(STILLS, images)]
    clips: dict[int, list[SourceOutput]] = {}
    for frame in frames:
        clips.setdefault(frame.item_index, []).append(frame)
    groups = []
    for index, clip in sorted(clips.items()):
        clip.sort(key=lambda frame: int(frame.params["frame"]))
        groups.append((item_name(index, int(clip[0].seed or 0)), clip))
    return groups


def _decoded(run: ShardRun, frames: list[SourceOutput], done: int, total: int) -> Iterator[Any]:
    """The frames decoded one at a time as ffmpeg takes them, reporting progress (which stops the
    encode when the job is cancelled)."""
    for n, frame in enumerate(frames):
        yield decode_image(frame, read_input(run, frame))
        run.progress(0.95 * (done + n + 1) / total)


def encode_video(run: ShardRun, name: str, frames: list[SourceOutput], done: int, total: int) -> tuple[bytes, Any]:
    """One video's mp4 and what :func:`probe_video` finds in it; ``done`` of ``total`` frames before it."""
    spec: EncodeSpec = run.spec
    first = decode_image(frames[0], read_input(run, frames[0]))
    try:
        mp4 = stream_mp4(_decoded(run, frames, done, total), first.size, spec.fps, crf=spec.crf)
    except FfmpegFailed as exc:
        raise StepInputError(f"video {name} ({len(frames)} frames): {exc}") from None
    except ValueError as exc:  # a frame of another size than the first, an unusable input
        raise StepInputError(f"video {name}: {exc}") from None
    info = probe_video(mp4)
    if info.frames != len(frames):
        raise StepInputError(f"video {name}: the mp4 has {info.frames} frames, expected {len(frames)}")
    return mp4, info


def run_encode_shard(run: ShardRun) -> int:
    """Encode every video of the source; returns items done."""
    spec: EncodeSpec = run.spec
    for item in run.items:
        if item["key"] in run.done_keys:
            continue
        groups = video_groups(source_images(run))
        outputs = StepOutputs.start(run, item)
        total = sum(len(frames) for _, frames in groups)
        done = 0
        for name, frames in groups:
            mp4, info = encode_video(run, name, frames, done, total)
            done += len(frames)
            key = artifact_key(spec.output_prefix, run.job_id, run.shard_index, name, "mp4")
            params = lineage_params(
                run, frames, fps=spec.fps, crf=spec.crf, frames=len(frames), width=info.width, height=info.height
            )
            outputs.record(key, mp4, "video/mp4", params, progress=0.95 * done / total)
        outputs.finish(fps=spec.fps, crf=spec.crf, videos=len(groups))
    return run.items_done
