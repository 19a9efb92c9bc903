"""Rendering ``face_identity`` shards (``identity.method = ip_adapter``; InstantID is in
:mod:`farm.worker.instantid`).

The IP-Adapter and its image encoder are pinned in the worker's component cache; reference
embeddings are computed once per job and kept in the worker's memo. A shard's items are grouped
by frame: every group applies the job's patches plus one :class:`~patching.ip_adapter.IPAdapterPatch`
(the identity prompt(s), and the frame's image prompt when the job has frames), then renders its
prompts x seeds like text-to-image.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any


def frame_groups(run: Any) -> Iterator[tuple[Any, list[tuple[int, dict[str, Any]]]]]:
    """``(frame_index, [(position, item), ...])`` per frame group of the shard (``None`` without
    frames), only the items not already written; groups with nothing left are skipped."""
    for frame_index, group in itertools.groupby(enumerate(run.items), key=lambda pair: pair[1].get("frame_index")):
        selected = [(p, item) for p, item in group if item["key"] not in run.done_keys]
        if selected:
            yield frame_index, selected


def _embeddings(run: Any, encoder: Any, adapter: Any, refs: list[Any], label: str) -> Any:
    """Embeddings ``(N, ...)`` of stored images, memoised per job and image set."""
    import torch

    from farm.inputs import load_image
    from patching.ip_adapter import clip_pixels, encode_images

    ident = run.spec.identity
    key = (str(run.job_id), label, tuple(r.key for r in refs), ident.crop, adapter.plus)

    def make() -> Any:
        images = [load_image(run.store, ref, f"{label}[{i}]") for i, ref in enumerate(refs)]
        with torch.inference_mode():
            return encode_images(encoder, clip_pixels(images, ident.crop), adapter.plus)

    return run.res.memo.remember(key, make)


def run_face_identity_shard(run: Any) -> int:
    if run.spec.identity.method == "instantid":
        from farm.worker.instantid import run_instantid_shard

        return run_instantid_shard(run)
    return run_ip_adapter_shard(run)


def run_ip_adapter_shard(run: Any) -> int:
    from patching.ip_adapter import ImagePrompt, IPAdapterPatch

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
    summary = {
        "identity": {
            "method": ident.method,
            "adapter": ident.adapter,
            "negative": ident.negative,
            "references": [r.key for r in ident.references],
            "combine": ident.combine,
            "weight": ident.weight,
            "mode": ident.mode,
            "start": ident.start,
            "stop": ident.stop,
        }
    }

    from farm.worker.renderers import render_prompt_items

    for frame_index, selected in frame_groups(run):
        prompts = list(identity_prompts)
        extra = dict(summary)
        if frame_index is not None:
            frame = spec.frames[int(frame_index)]
            embeds = _embeddings(run, encoder, adapter, [frame], f"frames[{frame_index}]")
            prompts.append(ImagePrompt(embeds, weight=ident.frame_weight, **window))
            extra["frame"] = {"index": int(frame_index), "key": frame.key, "weight": ident.frame_weight}
        run.apply_patches([IPAdapterPatch(adapter, tuple(prompts), mode=ident.mode, negative=negative)])
        render_prompt_items(run, selected, extra)
    return run.items_done


run_face_identity_shard.applies_patches = True  # type: ignore[attr-defined]
