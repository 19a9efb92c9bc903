"""Rendering ``temporal_video`` clips with a resident Stable Video Diffusion pipeline.

:func:`render_video_segment` runs one segment; :func:`run_temporal_video_shard` renders each
clip of a shard segment by segment (conditioning every segment after the first on the previous
segment's last frame), writes every frame as it is made, then the clip's mp4 and GIF preview.
Frames already in the store from an earlier attempt are read back instead of rendered again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm.errors import FarmError

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SegmentRequest:
    seed: int
    num_frames: int
    steps: int
    min_guidance: float
    max_guidance: float
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    decode_chunk_size: int
    width: int
    height: int


def render_video_segment(
    pipeline: Any, image: Any, request: SegmentRequest, on_step: StepCallback | None = None
) -> list:
    """``num_frames`` PIL frames conditioned on ``image``."""
    import torch

    from farm.worker.renderers import step_callback

    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    callback = step_callback(on_step, request.steps)
    with torch.inference_mode():
        result = pipeline(
            image,
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            num_inference_steps=request.steps,
            min_guidance_scale=request.min_guidance,
            max_guidance_scale=request.max_guidance,
            fps=request.fps,
            motion_bucket_id=request.motion_bucket_id,
            noise_aug_strength=request.noise_aug_strength,
            decode_chunk_size=min(request.decode_chunk_size, request.num_frames),
            generator=generator,
            output_type="pil",
            callback_on_step_end=callback,
        )
    frames = list(result.frames[0])
    if len(frames) != request.num_frames:
        raise FarmError(f"the pipeline returned {len(frames)} frames, expected {request.num_frames}")
    return frames


def run_temporal_video_shard(run: Any) -> int:
    """Render every clip of the shard not already finished; returns clips done."""
    from farm.inputs import load_image
    from farm.media import decode_png, encode_frame_png, encode_gif, encode_mp4, probe_video
    from farm.temporal_video import frame_key, preview_key, segment_seed

    spec = run.spec
    units = len(run.items) * spec.segments  # progress counts segments
    for position, item in enumerate(run.items):
        if item["key"] in run.done_keys:
            continue
        image_index = int(item["image_index"])
        ref = spec.images[image_index]
        condition = load_image(run.store, ref, f"images[{image_index}]")
        clip_params = {
            **run.base_params(),
            "seed": int(item["seed"]),
            "image": ref.model_dump(mode="json"),
            "num_frames": spec.num_frames,
            "segments": spec.segments,
            "fps": spec.fps,
            "motion_bucket_id": spec.motion_bucket_id,
            "noise_aug_strength": spec.noise_aug_strength,
            "steps": spec.steps,
            "min_guidance": spec.min_guidance,
            "guidance": spec.guidance,
            "width": spec.width,
            "height": spec.height,
        }
        frames: list[Any] = []
        for segment in range(spec.segments):
            unit = position * spec.segments + segment
            first = segment * spec.num_frames
            keys = [frame_key(spec, run.job_id, run.shard_index, item, first + f) for f in range(spec.num_frames)]
            if all(key in run.done_keys for key in keys):
                segment_frames = [decode_png(run.store.get_bytes(key)) for key in keys]
            else:
                request = SegmentRequest(
                    seed=segment_seed(int(item["seed"]), segment),
                    num_frames=spec.num_frames,
                    steps=spec.steps,
                    min_guidance=spec.min_guidance,
                    max_guidance=spec.guidance,
                    fps=spec.fps,
                    motion_bucket_id=spec.motion_bucket_id,
                    noise_aug_strength=spec.noise_aug_strength,
                    decode_chunk_size=min(spec.decode_chunk_size, run.memory.get("decode_chunk_size", 64)),
                    width=spec.width,
                    height=spec.height,
                )

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
        clip = {**clip_params, "frames": len(frames)}
        run.record(preview_key(spec, run.job_id, run.shard_index, item), gif, "image/gif", item=item, params=clip,
                   progress=progress)  # fmt: skip
        run.record(item["key"], mp4, "video/mp4", item=item, params=clip, progress=progress, item_finished=True)
    return run.items_done
