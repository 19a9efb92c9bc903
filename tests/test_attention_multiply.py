"""Attention multipliers on tiny SD1.5, SDXL and SVD models: neutral at 1.0, exact restore,
and only the intended parameters change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from patching import (  # noqa: E402
    CLIPAttentionMultiply,
    ModelPatcher,
    PatchError,
    UNetCrossAttentionMultiply,
    UNetSelfAttentionMultiply,
    UNetTemporalAttentionMultiply,
)

PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "svd": "StableVideoDiffusionPipeline",
}


@pytest.fixture(scope="module")
def pipes(tiny_models: dict[str, Path]) -> dict[str, Any]:
    out = {}
    for family, cls in PIPELINES.items():
        pipe = getattr(diffusers, cls).from_pretrained(tiny_models[family])
        pipe.set_progress_bar_config(disable=True)
        out[family] = pipe
    return out


def _render(pipe: Any, family: str) -> Any:
    generator = torch.Generator().manual_seed(3)
    if family == "svd":
        from PIL import Image

        image = Image.new("RGB", (32, 32), (200, 80, 40))
        return pipe(image, height=32, width=32, num_frames=3, num_inference_steps=2, decode_chunk_size=3,
                    generator=generator, output_type="pt").frames  # fmt: skip
    return pipe("a cat", num_inference_steps=2, width=64, height=64, generator=generator, output_type="pt").images


def _params(pipe: Any) -> dict[str, Any]:
    return {
        f"{c}.{n}": p.detach().clone()
        for c, m in pipe.components.items()
        if hasattr(m, "named_parameters")
        for n, p in m.named_parameters()
    }


NEUTRAL = [
    UNetSelfAttentionMultiply(),
    UNetCrossAttentionMultiply(),
    UNetTemporalAttentionMultiply(),
]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "svd"])
def test_multipliers_at_one_leave_the_output_bit_identical(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    baseline = _render(pipe, family)
    patches = NEUTRAL + ([CLIPAttentionMultiply()] if family != "svd" else [])
    handle = ModelPatcher(pipe).apply(patches)
    assert handle.changed_parameters == []
    assert torch.equal(_render(pipe, family), baseline)
    handle.remove()


@pytest.mark.parametrize("family", ["sd15", "sdxl", "svd"])
def test_unpatch_restores_weights_and_output_exactly(pipes: dict[str, Any], family: str) -> None:
    pipe = pipes[family]
    before, baseline = _params(pipe), _render(pipe, family)
    patches = [
        UNetSelfAttentionMultiply(q=1.3, k=0.7, v=1.1, out=0.9),
        UNetCrossAttentionMultiply(q=0.5, k=2.0, v=1.7, out=1.2),
        UNetTemporalAttentionMultiply(self_structural=1.4, self_temporal=0.6, cross_structural=1.1, cross_temporal=2.5),
    ] + ([CLIPAttentionMultiply(q=1.2, k=0.8, v=1.5, out=0.5)] if family != "svd" else [])
    handle = ModelPatcher(pipe).apply(patches)
    assert not torch.equal(_render(pipe, family), baseline)
    handle.remove()
    after = _params(pipe)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert torch.equal(_render(pipe, family), baseline)


def _changed(pipe: Any, patch: Any) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    before = _params(pipe)
    handle = ModelPatcher(pipe).apply([patch])
    after = _params(pipe)
    handle.remove()
    changed = sorted(handle.changed_parameters)
    differ = {k for k in before if not torch.equal(before[k], after[k])}
    assert differ <= set(changed)  # listed ones may equal their originals (zero biases x f)
    return changed, before, after


def test_self_attention_multiply_changes_only_attn1_projections(pipes: dict[str, Any]) -> None:
    pipe = pipes["sd15"]
    changed, before, after = _changed(pipe, UNetSelfAttentionMultiply(q=2.0, out=0.5))
    layers = [k.removesuffix(".processor") for k in pipe.unet.attn_processors if ".attn1." in k]
    assert len(layers) == 4
    expected = sorted(
        [f"unet.{p}.to_q.weight" for p in layers]
        + [f"unet.{p}.to_out.0.{w}" for p in layers for w in ("weight", "bias")]
    )
    assert changed == expected  # to_q has no bias in diffusers; k and v stayed at 1.0
    for name in changed:
        factor = 2.0 if ".to_q." in name else 0.5
        assert torch.equal(after[name], before[name] * factor)


def test_cross_attention_multiply_on_sdxl_covers_every_transformer_block(pipes: dict[str, Any]) -> None:
    changed, _, _ = _changed(pipes["sdxl"], UNetCrossAttentionMultiply(k=3.0, v=3.0))
    assert len(changed) == 8 * 2  # 4 sites x 2 transformer blocks, k and v weights
    assert all(".attn2.to_k.weight" in n or ".attn2.to_v.weight" in n for n in changed)
    assert any(n.startswith("unet.mid_block.") for n in changed)


def test_temporal_multiply_leaves_spatial_parameters_untouched(pipes: dict[str, Any]) -> None:
    pipe = pipes["svd"]
    changed, before, after = _changed(pipe, UNetTemporalAttentionMultiply(self_temporal=2.0, cross_temporal=4.0))
    temporal_layers = [
        k.removesuffix(".processor") for k in pipe.unet.attn_processors if ".temporal_transformer_blocks." in k
    ]
    assert len(temporal_layers) == 8  # 4 sites x (attn1, attn2)
    assert changed == sorted(f"unet.{p}.to_out.0.{w}" for p in temporal_layers for w in ("weight", "bias"))
    for name in changed:
        assert torch.equal(after[name], before[name] * (2.0 if ".attn1." in name else 4.0))
    spatial = [n for n in before if "transformer_blocks" in n and ".temporal_transformer_blocks." not in n]
    assert spatial and all(torch.equal(before[n], after[n]) for n in spatial)

    changed, _, _ = _changed(pipe, UNetTemporalAttentionMultiply(self_structural=2.0))
    assert len(changed) == 8 and all(".temporal_transformer_blocks." not in n and ".attn1." in n for n in changed)


def test_clip_multiply_patches_both_sdxl_text_encoders(pipes: dict[str, Any]) -> None:
    changed, _, _ = _changed(pipes["sdxl"], CLIPAttentionMultiply(q=2.0, out=2.0))
    assert all(".self_attn.q_proj." in n or ".self_attn.out_proj." in n for n in changed)
    encoders = {n.split(".", 1)[0] for n in changed}
    assert encoders == {"text_encoder", "text_encoder_2"}
    assert len(changed) == 2 * 2 * 4  # 2 encoders x 2 layers x (q weight, q bias, out weight, out bias)
    with pytest.raises(PatchError, match="no text encoder"):
        ModelPatcher(pipes["svd"]).apply([CLIPAttentionMultiply(q=2.0)])


@pytest.mark.parametrize("value", [-0.1, 10.01, float("nan"), float("inf"), True, "2"])
def test_factors_outside_the_seed_range_are_refused(value: Any) -> None:
    with pytest.raises(PatchError, match=r"unet_temporal_attention_multiply\.self_temporal"):
        UNetTemporalAttentionMultiply(self_temporal=value)
    assert UNetSelfAttentionMultiply(q=0.0, out=10.0).q == 0.0
