"""Running ``temporal_video`` shards with a resident Stable Video Diffusion pipeline.

:func:`render_video_segment` runs one segment; :func:`run_temporal_video_shard` renders each
clip of a shard segment by segment (conditioning every segment after the first on the previous
segment's last frame), writes every frame as it is made, then the clip's mp4 and GIF preview.
Frames already in the store from an earlier attempt are read back instead of rendered again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from farm.errors import FarmError
from farm.inputs import load_image
from farm.kinds.base import item_name
from farm.media import decode_png, encode_frame_png, encode_gif, encode_mp4, probe_video
from farm.worker.images import StepCallback, step_callback
from farm.worker.shard_run import ShardRun
from storage.objects.keys import artifact_key

if TYPE_CHECKING:
    from farm.kinds.temporal_video import TemporalVideoSpec


def segment_seed(seed: int, segment: int) -> int:
    """The noise seed of segment ``segment`` of the clip with ``seed`` (segment 0 uses ``seed``)."""
    if segment == 0:
        return seed
    digest = hashlib.sha256(f"temporal_video:{seed}:{segment}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def frame_key(spec: TemporalVideoSpec, job_id: Any, shard_index: int, item: dict[str, Any], frame: int) -> str:
    """Object key of frame ``frame`` (0-based, across segments) of a clip item."""
    stem = item_name(int(item["index"]), int(item["seed"]))
    return artifact_key(spec.output_prefix, job_id, shard_index, f"{stem}-f{frame:05d}", "png")


def preview_key(spec: TemporalVideoSpec, job_id: Any, shard_index: int, item: dict[str, Any]) -> str:
    """Object key of a clip's GIF preview."""
    stem = item_name(int(item["index"]), int(item["seed"]))
    return artifact_key(spec.output_prefix, job_id, shard_index, stem, "gif")


NOT_RECORDED = ("seed", "decode_chunk_size")  # the clip records its own seed; the chunk is a memory limit


@dataclass(frozen=True)
class SegmentRequest:
    """One segment to render: the SVD call's settings (``seed``: this segment's noise)."""

    seed: int
    num_frames: int
    steps: int
    min_guidance: float
    guidance: float  # the last frame's (SVD's max_guidance_scale)
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    decode_chunk_size: int
    width: int
    height: int

    @classmethod
    def for_clip(cls, spec: TemporalVideoSpec, seed: int, max_decode_chunk: int = 64) -> SegmentRequest:
        """Segment 0 of the clip with ``seed``; ``max_decode_chunk``: a memory limit."""
        return cls(
            seed=seed,
            num_frames=spec.num_frames,
            steps=spec.steps,
            min_guidance=spec.min_guidance,
            guidance=spec.guidance,
            fps=spec.fps,
            motion_bucket_id=spec.motion_bucket_id,
            noise_aug_strength=spec.noise_aug_strength,
            decode_chunk_size=min(spec.decode_chunk_size, max_decode_chunk),
            width=spec.width,
            height=spec.height,
        )

    def segment(self, index: int) -> SegmentRequest:
        """Segment ``index`` of this clip (its noise from :func:`segment_seed`)."""
        return dataclasses.replace(self, seed=segment_seed(self.seed, index))

    def recorded(self) -> dict[str, Any]:
        """The clip settings every output of the clip records."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_RECORDED}


def render_video_segment(
    pipeline: Any, image: Any, request: SegmentRequest, on_step: StepCallback | None = None
) -> list:
    """``num_frames`` PIL frames conditioned on ``image``."""
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    with torch.inference_mode():
        result = pipeline(
            image,
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            num_inference_steps=request.steps,
            min_guidance_scale=request.min_guidance,
            max_guidance_scale=request.guidance,
            fps=request.fps,
            motion_bucket_id=request.motion_bucket_id,
            noise_aug_strength=request.noise_aug_strength,
            decode_chunk_size=min(request.decode_chunk_size, request.num_frames),
            generator=generator,
            output_type="pil",
            callback_on_step_end=step_callback(on_step, request.steps),
        )
    frames = list(result.frames[0])
    if len(frames) != request.num_frames:
        raise FarmError(f"the pipeline returned {len(frames)} frames, expected {request.num_frames}")
    return frames


def run_temporal_video_shard(run: ShardRun) -> int:
    """Render every clip of the shard not already finished; returns clips done."""
    spec = run.spec
    units = len(run.items) * spec.segments  # progress counts segments
    for position, item in enumerate(run.items):
        if item["key"] in run.done_keys:
            continue
        image_index = int(item["image_index"])
        ref = spec.images[image_index]
        condition = load_image(run.store, ref, f"images[{image_index}]")
        clip = SegmentRequest.for_clip(spec, int(item["seed"]), run.memory.get("decode_chunk_size", 64))
        clip_params = {
            **run.base_params(),
            "seed": clip.seed,
            "image": ref.model_dump(mode="json"),
            "segments": spec.segments,
            **clip.recorded(),
        }
        frames: list[Any] = []
        for segment in range(spec.segments):
            unit = position * spec.segments + segment
            first = segment * spec.num_frames
            keys = [frame_key(spec, run.job_id, run.shard_index, item, first + f) for f in range(spec.num_frames)]
            if all(key in run.done_keys for key in keys):
                segment_frames = [decode_png(run.store.get_bytes(key)) for key in keys]
            else:
                request = clip.segment(segment)

                def on_step(step: int, steps: int, unit: int = unit) -> None:
                    run.progress((unit + step / steps) / units)

                started = time.perf_counter()
                segment_frames = render_video_segment(run.pipeline, condition, request, on_step)
                run.add_time("denoise_s", time.perf_counter() - started)
                for f, (key, frame) in enumerate(zip(keys, segment_frames, strict=True)):
                    if key in run.done_keys:
                        continue
                    params = {**clip_params, "segment": segment, "segment_seed": request.seed, "frame": first + f}
                    run.record(key, encode_frame_png(frame), "image/png", item=item, params=params,
                               progress=(unit + 1) / units)  # fmt: skip
            frames.extend(segment_frames)
            condition = segment_frames[-1]

        started = time.perf_counter()
        mp4 = encode_mp4(frames, spec.fps)
        info = probe_video(mp4)
        if info.frames != len(frames):
            raise FarmError(f"the encoded mp4 has {info.frames} frames, expected {len(frames)}")
        gif = encode_gif(frames, spec.fps)
        run.add_time("encode_s", time.perf_counter() - started)
        progress = (position + 1) * spec.segments / units
        clip_done = {**clip_params, "frames": len(frames)}
        run.record(preview_key(spec, run.job_id, run.shard_index, item), gif, "image/gif", item=item,
                   params=clip_done, progress=progress)  # fmt: skip
        run.record(item["key"], mp4, "video/mp4", item=item, params=clip_done, progress=progress, item_finished=True)
    return run.items_done
