"""Rendering images with a resident diffusers pipeline: what every image kind's runner shares.

An :class:`ImageRequest` is one image to render: the arguments of the pipeline call (the common
ones as fields, a kind's own in :attr:`ImageRequest.pipeline_args`) and the parameters its output
records (:meth:`ImageRequest.parameters`). :func:`render_image_items` renders a shard's requests
with a seeded generator, reports each step through the shard (which may stop it: cancellation, a
lost lease) and records each PNG, with the generation parameters embedded as text chunks. A new
image kind builds its requests and calls it; it never edits this module.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from PIL.PngImagePlugin import PngInfo

from farm.job_spec import SCHEDULERS
from farm.worker.memory import vae_tiling

if TYPE_CHECKING:
    from farm.worker.shard_run import ShardRun

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageRequest:
    """One image to render. ``pipeline_args``: further arguments of the pipeline call (a
    ControlNet's image and strengths, ...). ``recorded``: further parameters the output records
    (an identity's settings, the frame it follows)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    pipeline_args: Mapping[str, Any] = field(default_factory=dict)
    recorded: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_item(cls, spec: Any, item: dict[str, Any], **extra: Any) -> ImageRequest:
        """The request of a prompt x seed item of ``spec`` (a bulk row's item carries its own
        prompt); ``extra`` sets ``pipeline_args`` and ``recorded``."""
        return cls(
            prompt=item.get("prompt", spec.prompts[item["prompt_index"]]),
            negative_prompt=item.get("negative_prompt", spec.negative_prompt),
            seed=int(item["seed"]),
            steps=spec.steps,
            guidance=spec.guidance,
            width=spec.width,
            height=spec.height,
            scheduler=spec.scheduler,
            **extra,
        )

    def call_args(self) -> dict[str, Any]:
        """Keyword arguments of the pipeline call (the generator and step callback aside)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt or None,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "width": self.width,
            "height": self.height,
            **self.pipeline_args,
        }

    def parameters(self) -> dict[str, Any]:
        """What the output records about its own generation (JSON-able)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "width": self.width,
            "height": self.height,
            "scheduler": self.scheduler,
        }


def set_scheduler(pipeline: Any, name: str) -> None:
    """Swap the pipeline's scheduler to ``name`` (cheap: built from the existing config)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    if type(pipeline.scheduler).__name__ == SCHEDULERS[name]:
        return
    # PNDM as Stable Diffusion runs it (PLMS steps only): its Runge-Kutta warm-up, the default
    # when the model ships another scheduler, triples the UNet calls and fails below ~6 steps.
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}
    pipeline.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipeline.scheduler.config, **overrides)


def step_callback(on_step: StepCallback | None, steps: int) -> Callable[..., dict[str, Any]]:
    """A diffusers ``callback_on_step_end`` that reports ``on_step(step, steps)`` (1-based)."""

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(step + 1, steps)
        return kwargs

    return callback


def render_image(pipeline: Any, request: ImageRequest, on_step: StepCallback | None = None) -> Any:
    """Render one image; returns a PIL image. ``on_step(step, total)`` runs after every step."""
    set_scheduler(pipeline, request.scheduler)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    with torch.inference_mode():
        result = pipeline(
            **request.call_args(),
            generator=generator,
            output_type="pil",
            callback_on_step_end=step_callback(on_step, request.steps),
        )
    return result.images[0]


def encode_png(image: Any, parameters: dict[str, Any]) -> bytes:
    """PNG bytes with the generation parameters as text chunks: ``parameters`` in the
    A1111-style one-line form image tools read, and ``farm`` as JSON."""
    info = PngInfo()
    line = (
        f"{parameters.get('prompt', '')}\nNegative prompt: {parameters.get('negative_prompt', '')}\n"
        f"Steps: {parameters.get('steps')}, Sampler: {parameters.get('scheduler')}, "
        f"CFG scale: {parameters.get('guidance')}, Seed: {parameters.get('seed')}, "
        f"Size: {parameters.get('width')}x{parameters.get('height')}, "
        f"Model hash: {parameters.get('model_hash', '')[:10]}"
    )
    info.add_text("parameters", line)
    info.add_text("farm", json.dumps(parameters, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


ItemRequest = tuple[int, dict[str, Any], ImageRequest]  # (position in the shard, item, request)


def item_requests(run: ShardRun, selected: Iterable[tuple[int, dict[str, Any]]], **extra: Any) -> list[ItemRequest]:
    """:meth:`ImageRequest.for_item` for each ``(position, item)``; ``extra`` as there."""
    return [(position, item, ImageRequest.for_item(run.spec, item, **extra)) for position, item in selected]


def render_image_items(run: ShardRun, requests: Iterable[ItemRequest], pipeline: Any = None) -> None:
    """Render and record each request whose item is not already written, with the model as it is
    patched now, through ``pipeline`` (default: the resident one)."""
    pipe = pipeline or run.pipeline
    total = len(run.items)
    for position, item, request in requests:
        if item["key"] in run.done_keys:
            continue

        def on_step(step: int, steps: int, position: int = position) -> None:
            run.progress((position + step / steps) / total)

        started = time.perf_counter()
        with vae_tiling(pipe, bool(run.memory.get("vae_tiling"))):
            image = render_image(pipe, request, on_step)
        params = {**request.parameters(), **run.base_params(), **request.recorded}
        if "row_id" in item:
            params["row_id"] = item["row_id"]
        png = encode_png(image, params)
        run.add_time("denoise_s", time.perf_counter() - started)
        run.record(
            item["key"], png, "image/png", item=item, params=params, progress=(position + 1) / total, item_finished=True
        )


def frame_groups(run: ShardRun) -> Iterator[tuple[Any, list[tuple[int, dict[str, Any]]]]]:
    """``(frame_index, [(position, item), ...])`` per frame group of the shard (``None`` without
    frames), only the items not already written; groups with nothing left are skipped."""
    for frame_index, group in itertools.groupby(enumerate(run.items), key=lambda pair: pair[1].get("frame_index")):
        selected = [(p, item) for p, item in group if item["key"] not in run.done_keys]
        if selected:
            yield frame_index, selected
