"""Running ``face_identity`` shards; ``identity.method = ip_adapter`` here, InstantID in
:mod:`farm.worker.kinds.face_identity_instantid`.

The IP-Adapter and its image encoder are pinned in the worker's component cache; reference
embeddings are computed once per job and kept in the worker's memo. A shard's items are grouped
by frame: every group applies the job's patches plus one :class:`~patching.ip_adapter.IPAdapterPatch`
(the identity prompt(s), and the frame's image prompt when the job has frames), then renders its
prompts x seeds like text-to-image.
"""

from __future__ import annotations

from typing import Any

import torch

from farm.inputs import load_image
from farm.worker.images import frame_groups, item_requests, render_image_items
from farm.worker.kinds.face_identity_instantid import run_instantid_shard
from farm.worker.shard_run import ShardRun
from patching.ip_adapter import ImagePrompt, IPAdapterPatch, clip_pixels, encode_images


def run_face_identity_shard(run: ShardRun) -> int:
    if run.spec.identity.method == "instantid":
        return run_instantid_shard(run)
    return run_ip_adapter_shard(run)


def _embeddings(run: ShardRun, encoder: Any, adapter: Any, refs: list[Any], label: str) -> Any:
    """Embeddings ``(N, ...)`` of stored images, memoised per job and image set."""
    ident = run.spec.identity
    key = (str(run.job_id), label, tuple(r.key for r in refs), ident.crop, adapter.plus)

    def make() -> Any:
        images = [load_image(run.store, ref, f"{label}[{i}]") for i, ref in enumerate(refs)]
        with torch.inference_mode():
            return encode_images(encoder, clip_pixels(images, ident.crop), adapter.plus)

    return run.res.memo.remember(key, make)


def run_ip_adapter_shard(run: ShardRun) -> int:
    spec = run.spec
    ident = spec.identity
    components = run.res.component_cache()
    adapter = components.get(ident.adapter, "ip_adapter").pipeline
    encoder = components.get(ident.image_encoder, "clip_vision").pipeline
    negative = components.get(ident.negative, "ip_negative").pipeline if ident.negative else None
    references = _embeddings(run, encoder, adapter, list(ident.references), "identity.references")
    window = {"start": ident.start, "stop": ident.stop}
    if ident.combine == "average":
        identity_prompts = [ImagePrompt(references.mean(dim=0, keepdim=True), weight=ident.weight, **window)]
    else:
        identity_prompts = [
            ImagePrompt(references[i : i + 1], weight=ident.weight, **window) for i in range(len(references))
        ]
    for frame_index, selected in frame_groups(run):
        prompts = list(identity_prompts)
        recorded: dict[str, Any] = {"identity": ident.summary()}
        if frame_index is not None:
            frame = spec.frames[int(frame_index)]
            embeds = _embeddings(run, encoder, adapter, [frame], f"frames[{frame_index}]")
            prompts.append(ImagePrompt(embeds, weight=ident.frame_weight, **window))
            recorded["frame"] = {"index": int(frame_index), "key": frame.key, "weight": ident.frame_weight}
        run.apply_patches([IPAdapterPatch(adapter, tuple(prompts), mode=ident.mode, negative=negative)])
        render_image_items(run, item_requests(run, selected, recorded=recorded))
    return run.items_done
