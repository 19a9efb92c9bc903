"""Renderers: turn one render item into image bytes with a resident diffusers pipeline.

A renderer gets the pipeline, the job spec (as a dict) and one item (prompt index and seed), runs
the denoising loop with a seeded generator and reports each step through ``on_step`` (which may
raise to stop: cancellation, a lost lease). Output: PNG bytes with the generation parameters
embedded as text chunks.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm.specs import SCHEDULERS

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class RenderRequest:
    """Everything one text-to-image render needs, independent of where it came from."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str


def set_scheduler(pipeline: Any, name: str) -> None:
    """Swap the pipeline's scheduler to ``name`` (cheap: built from the existing config)."""
    import diffusers

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


def render_text_to_image(
    pipeline: Any, request: RenderRequest, on_step: StepCallback | None = None, call_args: dict[str, Any] | None = None
) -> Any:
    """Render one image; returns a PIL image. ``on_step(step, total)`` runs after every step."""
    import torch

    set_scheduler(pipeline, request.scheduler)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    callback = step_callback(on_step, request.steps)
    with torch.inference_mode():
        result = pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            width=request.width,
            height=request.height,
            generator=generator,
            output_type="pil",
            callback_on_step_end=callback,
            **(call_args or {}),
        )
    return result.images[0]


def encode_png(image: Any, parameters: dict[str, Any]) -> bytes:
    """PNG bytes with the generation parameters as text chunks: ``parameters`` in the
    A1111-style one-line form image tools read, and ``farm`` as JSON."""
    from PIL.PngImagePlugin import PngInfo

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


def render_prompt_items(
    run: Any,
    selected: list[tuple[int, dict[str, Any]]],
    extra: dict[str, Any],
    pipeline: Any = None,
    call_args: dict[str, Any] | None = None,
) -> None:
    """Render the ``(position, item)`` pairs of a prompt x seed shard not already written, with
    the model as it is patched now (through ``pipeline``, default the resident one, with
    ``call_args`` added to its call); ``extra`` is added to every output's parameters."""
    import time

    from farm.worker.memory import vae_tiling

    spec, total = run.spec, len(run.items)
    for position, item in selected:
        if item["key"] in run.done_keys:
            continue
        request = RenderRequest(  # a bulk row's item carries its own prompt
            prompt=item.get("prompt", spec.prompts[item["prompt_index"]]),
            negative_prompt=item.get("negative_prompt", spec.negative_prompt),
            seed=int(item["seed"]),
            steps=spec.steps,
            guidance=spec.guidance,
            width=spec.width,
            height=spec.height,
            scheduler=spec.scheduler,
        )

        def on_step(step: int, steps: int, position: int = position) -> None:
            run.progress((position + step / steps) / total)

        started = time.perf_counter()
        with vae_tiling(pipeline or run.pipeline, bool(run.memory.get("vae_tiling"))):
            image = render_text_to_image(pipeline or run.pipeline, request, on_step, call_args)
        params = {**request.__dict__, **run.base_params(), **extra}
        if "row_id" in item:
            params["row_id"] = item["row_id"]
        png = encode_png(image, params)
        run.add_time("denoise_s", time.perf_counter() - started)
        run.record(
            item["key"], png, "image/png", item=item, params=params, progress=(position + 1) / total, item_finished=True
        )


def run_text_to_image_shard(run: Any) -> int:
    """Render every item of a ``text_to_image`` shard not already written; returns items done."""
    render_prompt_items(run, list(enumerate(run.items)), {})
    return run.items_done
