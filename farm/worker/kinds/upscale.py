"""Running ``upscale`` shards: each source image of this part, read and checked, enlarged
``scale`` times with a Lanczos filter, written as PNG under the source image's name. With
``method: img2img`` the enlarged image is then refined by the img2img pipeline of the job's
model (:mod:`farm.worker.kinds.upscale_img2img`, imported only then: a ``farm.cpu`` worker runs
Lanczos steps without torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farm.media import encode_frame_png
from farm.worker.shard_run import ShardRun
from farm.worker.step_inputs import StepInputError, StepOutputs, decode_image, lineage_params, read_input, source_images
from storage.objects.keys import artifact_key

if TYPE_CHECKING:
    from farm.kinds.upscale import UpscaleSpec

FILTER = "lanczos"


def run_upscale_shard(run: ShardRun) -> int:
    """Upscale this part's images (positions ``part, part + parts, ...`` of the source's images in
    item and key order); returns items done."""
    from PIL import Image

    spec: UpscaleSpec = run.spec
    refiner = None
    if spec.method == "img2img":
        from farm.worker.kinds.upscale_img2img import Refiner  # torch and diffusers: GPU-queue workers only

        refiner = Refiner(run)
    for item in run.items:
        if item["key"] in run.done_keys:
            continue
        part = int(item["part"])
        mine = source_images(run)[part :: spec.parts]
        outputs = StepOutputs.start(run, item)
        for n, source in enumerate(mine):
            image = decode_image(source, read_input(run, source))
            size = (image.width * spec.scale, image.height * spec.scale)
            if size[0] * size[1] > spec.max_pixels:
                raise StepInputError(
                    f"input {source.key}: {image.width}x{image.height} upscaled {spec.scale}x is {size[0]}x{size[1]} "
                    f"= {size[0] * size[1]} pixels, above max_pixels ({spec.max_pixels}); use a smaller scale"
                )
            bigger = image.resize(size, Image.Resampling.LANCZOS)
            settings: dict[str, Any] = {"method": spec.method}
            if refiner is not None:
                bigger, refined = refiner.apply(bigger, source, n, len(mine))
                settings.update(refined)
            key = artifact_key(spec.output_prefix, run.job_id, run.shard_index, source.stem, "png")
            params = lineage_params(
                run,
                [source],
                scale=spec.scale,
                filter=FILTER,
                width=size[0],
                height=size[1],
                source_width=image.width,
                source_height=image.height,
                **settings,
                **({"frame": source.params["frame"]} if "frame" in source.params else {}),
            )
            outputs.record(key, encode_frame_png(bigger), "image/png", params, progress=0.99 * (n + 1) / len(mine))
        outputs.finish(scale=spec.scale, filter=FILTER, method=spec.method, images=len(mine))
    return run.items_done
