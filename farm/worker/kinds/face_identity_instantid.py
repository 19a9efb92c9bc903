"""Running ``face_identity`` shards with ``identity.method = instantid``.

Per job, once: the reference faces are found and embedded (insightface, pinned per worker) and the
result, ``FACE_EMBEDS``, is stored beside the job's outputs as ``face_embeds.safetensors`` (raw
embeddings, keypoints, image sizes), so other shards and other workers load it instead of running
detection again. Per frame group: the InstantID attention patch (and, with a ControlNet folder,
IdentityNet fed the face tokens and the keypoint image) is applied, then the items render.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from farm.errors import UserError
from farm.inputs import describe, load_image
from farm.worker.images import frame_groups, item_requests, render_image_items
from farm.worker.shard_run import ShardRun
from patching.face_analysis import NoFaceFound, keypoint_image
from patching.instantid import IdentityNetTokens, InstantIDPatch
from storage.objects.keys import job_prefix, join_key

EMBEDS_FILE = "face_embeds.safetensors"
CONTROLNET_PIPELINES = {"sd15": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}


class NoFace(UserError):
    """An identity image has no detectable face (the shard fails with this reason)."""


def _analyzer(run: ShardRun) -> Any:
    settings = run.res.settings
    kind = f"face_analysis/{settings.worker.onnx_providers}"
    return run.res.component_cache().get(str(settings.face_models_dir), kind).pipeline


def _detect(run: ShardRun, refs: list[Any], labels: list[str]) -> dict[str, Any]:
    """Embeddings, keypoints and sizes of the largest face in each image; :class:`NoFace` naming
    the first image without one."""
    images = [load_image(run.store, ref, label) for ref, label in zip(refs, labels, strict=True)]
    named = [describe(label, ref) for ref, label in zip(refs, labels, strict=True)]
    try:
        embeds, faces = _analyzer(run).embed(images, named)
    except NoFaceFound as exc:
        raise NoFace(str(exc)) from None
    return {
        "embeddings": embeds,
        "keypoints": torch.tensor([f.keypoints.tolist() for f in faces], dtype=torch.float32),
        "sizes": torch.tensor([image.size for image in images], dtype=torch.float32),
    }


def face_embeds(run: ShardRun) -> dict[str, Any]:
    """The job's reference faces: from the worker memo, the job's stored file, or detection."""
    key = join_key(job_prefix(run.spec.output_prefix, run.job_id), EMBEDS_FILE)

    def make() -> dict[str, Any]:
        if run.store.exists(key):
            return load_tensors(run.store.get_bytes(key))
        refs = list(run.spec.identity.references)
        found = _detect(run, refs, [f"identity.references[{i}]" for i in range(len(refs))])
        data = save_tensors({k: v.contiguous() for k, v in found.items()})
        run.store.put_bytes(key, data, content_type="application/octet-stream")
        return found

    return run.res.memo.remember(("face_embeds", key), make)


def _mask(run: ShardRun) -> Any:
    ref = run.spec.identity.mask
    if ref is None:
        return None
    image = load_image(run.store, ref, "identity.mask").convert("L")
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width)
    return data.float() / 255.0


def _keypoint_image(keypoints: Any, source_size: Any, width: int, height: int) -> Any:
    """Drawn on the canvas of the image the keypoints came from, then resized to the output."""
    source = (round(float(source_size[0])), round(float(source_size[1])))
    return keypoint_image(keypoints.tolist(), source, (width, height))


def _controlnet_pipeline(run: ShardRun, controlnet: Any) -> Any:
    derived = run.loaded.derived  # lives and dies with the resident pipeline it is built on
    key = ("controlnet_pipeline", run.spec.identity.controlnet)
    if key not in derived:
        cls = getattr(diffusers, CONTROLNET_PIPELINES[run.spec.family])
        pipe = cls.from_pipe(run.pipeline, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        derived[key] = pipe
    return derived[key]


def run_instantid_shard(run: ShardRun) -> int:
    spec, ident = run.spec, run.spec.identity
    components = run.res.component_cache()
    adapter = components.get(ident.checkpoint, "instantid").pipeline
    references = face_embeds(run)
    mask = _mask(run)
    controlnet = components.get(ident.controlnet, "controlnet").pipeline if ident.controlnet else None
    pose = None
    if ident.pose is not None:  # once per job, like the references
        pose = run.res.memo.remember(("pose", str(run.job_id)), lambda: _detect(run, [ident.pose], ["identity.pose"]))
    for frame_index, selected in frame_groups(run):
        embeddings, keypoints, source = references["embeddings"], references["keypoints"][0], references["sizes"][0]
        recorded: dict[str, Any] = {"identity": ident.summary()}
        if frame_index is not None:
            frame = spec.frames[int(frame_index)]
            found = _detect(run, [frame], [f"frames[{frame_index}]"])
            embeddings = torch.cat([embeddings, found["embeddings"]])
            keypoints, source = found["keypoints"][0], found["sizes"][0]
            recorded["frame"] = {"index": int(frame_index), "key": frame.key}
        if pose is not None:
            keypoints, source = pose["keypoints"][0], pose["sizes"][0]
        device, dtype = adapter.device, adapter.layers[0][0].dtype
        instantid = InstantIDPatch(
            adapter,
            embeddings.to(device=device, dtype=dtype),
            weight=ident.weight,
            start_at=ident.start_at,
            end_at=ident.end_at,
            noise=ident.noise,
            combine=ident.combine,
            mask=mask,
            mask_resize=ident.mask_resize,
        )
        patches: list[Any] = [instantid]
        if controlnet is None:
            run.apply_patches(patches)
            render_image_items(run, item_requests(run, selected, recorded=recorded))
            continue
        cond, uncond = instantid.face_tokens()
        run.apply_patches([*patches, IdentityNetTokens(controlnet, cond, uncond)])
        pipe = _controlnet_pipeline(run, controlnet)
        controlnet_args = {
            "image": _keypoint_image(keypoints, source, spec.width, spec.height),
            "controlnet_conditioning_scale": ident.controlnet_strength,
            "control_guidance_start": ident.controlnet_start,
            "control_guidance_end": ident.controlnet_end,
        }
        requests = item_requests(run, selected, pipeline_args=controlnet_args, recorded=recorded)
        with run.loaded.patcher.running(pipe):
            render_image_items(run, requests, pipeline=pipe)
    return run.items_done
