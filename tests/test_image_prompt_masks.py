"""Attention masks of the additive image-prompt patches (IP-Adapter, InstantID) against diffusers'
own masked IP-Adapter (``cross_attention_kwargs={"ip_adapter_masks": ...}``) on tiny SD1.5 and
SDXL, with masks whose edges fall between the cells of the token grids (where the resize mode
matters), and the exact neutral cases: an all-ones mask is no mask, an all-zeros mask no patch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from farm.tiny_components import build_tiny_ip_adapter  # noqa: E402
from patching import ModelPatcher, PatchError  # noqa: E402
from patching.image_prompt_attention import ImagePromptBranch  # noqa: E402
from patching.instantid import InstantIDPatch  # noqa: E402
from patching.ip_adapter import ImagePrompt, IPAdapterPatch, load_ip_adapter  # noqa: E402

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# Latents of two Euler steps at guidance 1.5 (|latents| ~ 55 on the tiny models): the unmasked
# patches agree with diffusers to ~2e-5 here (the projection's float order; with diffusers' own
# projection the masked IP-Adapter is bit-identical), while the bilinear resize is 0.09-0.7 off.
TOLERANCE = 1e-4
WEIGHT = 0.7


def _left_columns() -> torch.Tensor:
    mask = torch.zeros(64, 64)
    mask[:, :25] = 1.0  # 25 of 64 columns: the edge falls inside a cell of every grid (8, 4, 2 wide)
    return mask


def _face_ellipse() -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    return ((((x - 30) / 17) ** 2 + ((y - 29) / 22) ** 2) <= 1).float()


MASKS = {"left25": _left_columns, "ellipse": _face_ellipse}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("masks")
    out = {}
    for family in ("sd15", "sdxl"):
        out[(family, "ip_adapter")] = build_tiny_ip_adapter(family, root / f"{family}-ip", plus=True)
        out[(family, "instantid")] = build_tiny_ip_adapter(
            family, root / f"{family}-iid", plus=True, tokens=16, embedding_dim=512, image_encoder=False
        )
    return out


def _pipe(tiny_models: dict, family: str) -> Any:
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(tiny_models[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe: Any, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    args = {"prompt": "a cat", "num_inference_steps": 2, "width": 64, "height": 64, "guidance_scale": 1.5}
    return pipe(**args, **kwargs, generator=generator, output_type="latent").images


def _embeds(kind: str, adapter: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if kind == "instantid":
        return torch.randn(1, 512, generator=generator) * 20  # a raw ArcFace embedding's scale
    return torch.randn(1, 257, adapter.projection.proj_in.in_features, generator=generator)  # CLIP hidden states


def _patch(kind: str, adapter: Any, embeds: torch.Tensor, **mask: Any) -> Any:
    if kind == "instantid":
        return InstantIDPatch(adapter, embeds, weight=WEIGHT, **mask)
    return IPAdapterPatch(adapter, (ImagePrompt(embeds, weight=WEIGHT, **mask),))


def _ours(pipe: Any, patch: Any) -> tuple[torch.Tensor, list[str]]:
    handle = ModelPatcher(pipe).apply([patch])
    try:
        return _latents(pipe), list(handle.replaced_processors)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def cases(tiny_models: dict, folders: dict) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (family, kind): our pipeline, diffusers' pipeline with the adapter loaded natively, the
    adapter, embeddings and diffusers' embeddings argument ([uncond, cond], one image)."""
    out = {}
    for (family, kind), folder in folders.items():
        native = _pipe(tiny_models, family)
        native.load_ip_adapter(
            str(folder), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None
        )
        native.set_ip_adapter_scale(WEIGHT)
        adapter = load_ip_adapter(folder / "ip-adapter.safetensors")
        embeds = _embeds(kind, adapter)
        image = embeds if kind == "ip_adapter" else embeds[:, None]  # one image: (1, tokens, dim)
        native_embeds = [torch.cat([torch.zeros_like(image), image]).unsqueeze(1)]
        out[(family, kind)] = {"ours": _pipe(tiny_models, family), "native": native, "adapter": adapter,
                               "embeds": embeds, "native_embeds": native_embeds}  # fmt: skip
    return out


def test_token_mask_is_diffusers_downsample() -> None:
    from diffusers.image_processor import IPAdapterMaskProcessor

    zeros = torch.zeros(2, 4)
    for mask in (_left_columns(), _face_ellipse(), torch.rand(48, 64, generator=torch.Generator().manual_seed(1))):
        h0, w0 = mask.shape
        for scale in (1, 2, 4, 8, 16):
            grid = (h0 // scale, w0 // scale)
            branch = ImagePromptBranch(zeros, zeros, zeros, zeros, mask=mask)
            expected = IPAdapterMaskProcessor.downsample(mask[None], 1, grid[0] * grid[1], 4)
            assert torch.equal(branch.token_mask(grid)[0, :, 0], expected[0, :, 0]), (tuple(mask.shape), grid)
    # Next to the edge at column 25 the bicubic taps straddle it: 1.09 on the 4x4 grid, -0.09 on
    # the 16x16 one (the overshoot diffusers computes, kept); bilinear stays within 0..1.
    bicubic = ImagePromptBranch(zeros, zeros, zeros, zeros, mask=_left_columns())
    bilinear = ImagePromptBranch(zeros, zeros, zeros, zeros, mask=_left_columns(), mask_resize="bilinear")
    assert bicubic.token_mask((4, 4)).max() > 1.05 and bicubic.token_mask((16, 16)).min() < -0.05
    for grid in ((4, 4), (16, 16)):
        assert bilinear.token_mask(grid).min() >= 0 and bilinear.token_mask(grid).max() <= 1
        assert not torch.equal(bicubic.token_mask(grid), bilinear.token_mask(grid))


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("kind", ["ip_adapter", "instantid"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_off_grid_masks_match_diffusers_ip_adapter_masks(cases: dict, family: str, kind: str, mask_name: str) -> None:
    case = cases[(family, kind)]
    mask = MASKS[mask_name]()
    native_args = {"ip_adapter_image_embeds": case["native_embeds"]}
    expected = _latents(case["native"], **native_args, cross_attention_kwargs={"ip_adapter_masks": [mask[None, None]]})
    if "unmasked" not in case:
        case["unmasked"] = _latents(case["native"], **native_args)
    unmasked = case["unmasked"]
    got, _ = _ours(case["ours"], _patch(kind, case["adapter"], case["embeds"], mask=mask))
    bilinear, _ = _ours(case["ours"], _patch(kind, case["adapter"], case["embeds"], mask=mask, mask_resize="bilinear"))
    diff, departure = (got - expected).abs().max(), (bilinear - expected).abs().max()
    effect = (expected - unmasked).abs().max()
    print(f"{family} {kind} {mask_name}: |ours - diffusers| {diff:.2e}, bilinear {departure:.2e}, mask {effect:.2e}")
    assert diff <= TOLERANCE
    assert effect > 1.0  # the mask matters
    assert departure > 100 * TOLERANCE  # and so does its resize mode


@pytest.mark.parametrize("kind", ["ip_adapter", "instantid"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_all_ones_is_unmasked_and_all_zeros_is_unpatched_exactly(cases: dict, family: str, kind: str) -> None:
    case = cases[(family, kind)]
    pipe, adapter, embeds = case["ours"], case["adapter"], case["embeds"]
    unpatched = _latents(pipe)
    unmasked, layers = _ours(pipe, _patch(kind, adapter, embeds))
    ones, ones_layers = _ours(pipe, _patch(kind, adapter, embeds, mask=torch.ones(37, 50)))
    zeros, zeros_layers = _ours(pipe, _patch(kind, adapter, embeds, mask=torch.zeros(37, 50), mask_resize="bilinear"))
    assert torch.equal(ones, unmasked) and ones_layers == layers
    assert torch.equal(zeros, unpatched) and zeros_layers == []  # nothing to gate: no processor swapped
    assert (unmasked - unpatched).abs().max() > 1e-3


def test_mask_settings_are_checked() -> None:
    with pytest.raises(PatchError, match="mask_resize 'nearest': expected one of bicubic, bilinear"):
        ImagePrompt(torch.zeros(1, 4), mask=torch.ones(4, 4), mask_resize="nearest")
    with pytest.raises(PatchError, match=r"must be \(H, W\)"):
        ImagePrompt(torch.zeros(1, 4), mask=torch.ones(1, 4, 4))
