"""The patcher core: block keys, reversible weight patches, processor swaps, step state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from farm.model_configs import REAL_UNETS  # noqa: E402
from patching import (  # noqa: E402
    ModelPatcher,
    Patch,
    PatchContext,
    PatchError,
    attention_paths,
    attention_sites,
    block_key_of,
    fingerprint,
)

SD15_UNET = REAL_UNETS["sd15"][1]
SDXL_UNET = REAL_UNETS["sdxl"][1]


def _meta_unet(config: dict[str, Any]) -> Any:
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**config)


# -- block keys ------------------------------------------------------------------------------
def test_sd15_block_keys_follow_the_reference_table() -> None:
    unet = _meta_unet(SD15_UNET)
    expected = {
        ("input", 1): "down_blocks.0.attentions.0",
        ("input", 2): "down_blocks.0.attentions.1",
        ("input", 4): "down_blocks.1.attentions.0",
        ("input", 5): "down_blocks.1.attentions.1",
        ("input", 7): "down_blocks.2.attentions.0",
        ("input", 8): "down_blocks.2.attentions.1",
        ("middle", 0): "mid_block.attentions.0",
        **{("output", n): f"up_blocks.{n // 3}.attentions.{n % 3}" for n in range(3, 12)},
    }
    assert {k: s.path for k, s in attention_sites(unet).items()} == expected
    assert attention_paths(unet, ("input", 1)) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    every = {p for key in expected for a in ("attn1", "attn2") for p in attention_paths(unet, key, a)}
    assert every == {k.removesuffix(".processor") for k in unet.attn_processors}
    assert len(unet.attn_processors) == 32


def test_sdxl_block_keys_follow_the_reference_table() -> None:
    unet = _meta_unet(SDXL_UNET)
    sites = attention_sites(unet)
    assert {k: (s.path, s.transformer_blocks) for k, s in sites.items()} == {
        ("input", 4): ("down_blocks.1.attentions.0", 2),
        ("input", 5): ("down_blocks.1.attentions.1", 2),
        ("input", 7): ("down_blocks.2.attentions.0", 10),
        ("input", 8): ("down_blocks.2.attentions.1", 10),
        ("middle", 0): ("mid_block.attentions.0", 10),
        ("output", 0): ("up_blocks.0.attentions.0", 10),
        ("output", 1): ("up_blocks.0.attentions.1", 10),
        ("output", 2): ("up_blocks.0.attentions.2", 10),
        ("output", 3): ("up_blocks.1.attentions.0", 2),
        ("output", 4): ("up_blocks.1.attentions.1", 2),
        ("output", 5): ("up_blocks.1.attentions.2", 2),
    }
    assert attention_paths(unet, ("input", 4, 1)) == ["down_blocks.1.attentions.0.transformer_blocks.1.attn2"]
    assert len(attention_paths(unet, ("middle", 0), "attn1")) == 10
    assert sum(len(attention_paths(unet, k)) for k in sites) == 70  # every SDXL cross-attention, middle included
    assert len(unet.attn_processors) == 140
    assert block_key_of(unet, "mid_block.attentions.0.transformer_blocks.7.attn2") == ("middle", 0, 7)
    assert block_key_of(unet, "conv_in") is None


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (("input", 1), "has no attention in this UNet2DConditionModel; it has ('input', 4)"),
        (("input", 4, 2), "transformer index out of range; this site has transformer_blocks 0..1"),
        (("side", 1), "expected (input|middle|output"),
        (("input", -1), "non-negative integers"),
        (("input",), "expected (input|middle|output"),
    ],
)
def test_unknown_block_keys_are_refused_clearly(key: tuple, message: str) -> None:
    with pytest.raises(PatchError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        attention_paths(_meta_unet(SDXL_UNET), key)


def test_svd_temporal_blocks_are_addressed_separately(tiny_models: dict[str, Path]) -> None:
    unet = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(tiny_models["svd"], subfolder="unet")
    spatial = attention_paths(unet, ("middle", 0), "attn1")
    temporal = attention_paths(unet, ("middle", 0), "attn1", temporal=True)
    assert spatial == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert temporal == ["mid_block.attentions.0.temporal_transformer_blocks.0.attn1"]
    every = {p for k in attention_sites(unet) for a in ("attn1", "attn2") for t in (False, True)
             for p in attention_paths(unet, k, a, temporal=t)}  # fmt: skip
    assert every == {k.removesuffix(".processor") for k in unet.attn_processors}
    with pytest.raises(PatchError, match="no temporal_transformer_blocks"):
        sd = _meta_unet(SD15_UNET)
        attention_paths(sd, ("input", 1), temporal=True)


# -- weight patches ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale(Patch):
    name: ClassVar[str] = "test_scale"
    param: str
    factor: float

    def apply(self, ctx: PatchContext) -> None:
        ctx.multiply(self.param, self.factor)


@dataclass(frozen=True)
class Shift(Patch):
    name: ClassVar[str] = "test_shift"
    param: str
    value: float
    alpha: float = 1.0

    def apply(self, ctx: PatchContext) -> None:
        ctx.add(self.param, torch.full_like(ctx.parameter(self.param), self.value), self.alpha)


@pytest.fixture(scope="module")
def unet(tiny_models: dict[str, Path]) -> Any:
    return diffusers.UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet").eval()


def _snapshot(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _unet_out(unet: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 500]), encoder_hidden_states=context).sample


OUT_W = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight"


def test_weight_patches_apply_in_order_and_restore_bit_exactly(unet: Any) -> None:
    before, out_before = _snapshot(unet), _unet_out(unet)
    original = unet.get_parameter(OUT_W.removeprefix("unet.")).detach().clone()
    patcher = ModelPatcher(unet)
    handle = patcher.apply([Scale(OUT_W, 3.0), Shift(OUT_W, 0.5, alpha=2.0)])
    assert handle.changed_parameters == [OUT_W]
    assert torch.equal(unet.get_parameter(OUT_W.removeprefix("unet.")), original * 3.0 + 1.0)
    assert not torch.equal(_unet_out(unet), out_before)
    handle.remove()
    assert _same(_snapshot(unet), before)
    assert torch.equal(_unet_out(unet), out_before)
    reverse = patcher.apply([Shift(OUT_W, 0.5, alpha=2.0), Scale(OUT_W, 3.0)])  # a different order, a different weight
    assert torch.equal(unet.get_parameter(OUT_W.removeprefix("unet.")), (original + 1.0) * 3.0)
    assert reverse.fingerprint != handle.fingerprint
    reverse.remove()
    reverse.remove()  # idempotent
    assert _same(_snapshot(unet), before)


def test_neutral_patches_touch_nothing(unet: Any) -> None:
    out_before = _unet_out(unet)
    handle = ModelPatcher(unet).apply([Scale(OUT_W, 1.0), Shift(OUT_W, 9.0, alpha=0.0)])
    assert handle.changed_parameters == []
    assert torch.equal(_unet_out(unet), out_before)
    handle.remove()


def test_a_failing_patch_leaves_the_model_untouched(unet: Any) -> None:
    before = _snapshot(unet)
    patcher = ModelPatcher(unet)
    with pytest.raises(PatchError, match=r"no parameter 'unet\.nope\.weight'"):
        patcher.apply([Scale(OUT_W, 2.0), Scale("unet.nope.weight", 2.0)])
    assert patcher.active is None
    assert _same(_snapshot(unet), before)


def test_a_failure_while_committing_rolls_back(unet: Any) -> None:
    before = _snapshot(unet)

    @dataclass(frozen=True)
    class Broken(Patch):
        name: ClassVar[str] = "test_broken"

        def apply(self, ctx: PatchContext) -> None:
            def hook() -> Any:
                raise RuntimeError("hook failed")

            ctx.install(hook)

    patcher = ModelPatcher(unet)
    with pytest.raises(RuntimeError, match="hook failed"):
        patcher.apply([Scale(OUT_W, 2.0), Broken()])
    assert patcher.active is None
    assert _same(_snapshot(unet), before)


def test_low_precision_weights_restore_exactly() -> None:
    layer = torch.nn.Linear(16, 16).to(torch.bfloat16)
    original = layer.weight.detach().clone()
    handle = ModelPatcher(layer).apply([Scale("unet.weight", 1.37)])
    assert handle.changed_parameters == ["unet.weight"]
    assert torch.equal(layer.weight, (original.float() * 1.37).to(torch.bfloat16))
    handle.remove()
    assert torch.equal(layer.weight, original)


def test_fingerprint_and_ensure(unet: Any) -> None:
    patcher = ModelPatcher(unet)
    assert fingerprint([Scale(OUT_W, 2.0)]) == fingerprint([Scale(OUT_W, 2.0)])
    assert fingerprint([Scale(OUT_W, 2.0)]) != fingerprint([Scale(OUT_W, 2.5)])
    assert patcher.fingerprint == fingerprint([])
    first = patcher.ensure([Scale(OUT_W, 2.0)])
    assert patcher.ensure([Scale(OUT_W, 2.0)]) is first and patcher.applies == 1
    with pytest.raises(PatchError, match="already applied"):
        patcher.apply([Scale(OUT_W, 2.0)])
    second = patcher.ensure([Scale(OUT_W, 4.0)])
    assert first.removed and second is patcher.active and patcher.applies == 2
    assert patcher.ensure([]) is None and patcher.active is None


# -- processors and step state -------------------------------------------------------------------
class Recorder:
    """Wraps a processor; records what the step state said at every call."""

    def __init__(self, inner: Any, state: Any, log: list[tuple]) -> None:
        self.inner, self.state, self.log = inner, state, log

    def __call__(self, attn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        s = self.state
        self.log.append((s.step_index, s.timestep, s.sigma, tuple(s.cond_or_uncond), s.batch_size))
        return self.inner(attn, hidden_states, *args, **kwargs)


@dataclass(frozen=True)
class Record(Patch):
    name: ClassVar[str] = "test_record"
    key: tuple
    log: list = None  # type: ignore[assignment]

    def params(self) -> dict[str, Any]:
        return {"key": list(self.key)}

    def apply(self, ctx: PatchContext) -> None:
        ctx.replace_attention(self.key, lambda previous: Recorder(previous, ctx.state, self.log))


def test_processor_patches_chain_and_see_the_step_state(tiny_models: dict[str, Path]) -> None:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_models["sd15"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    run = dict(prompt="a cat", num_inference_steps=3, width=64, height=64, output_type="np")
    baseline = pipe(**run, generator=torch.Generator().manual_seed(1)).images
    patcher = ModelPatcher(pipe)
    first, second = [], []
    path = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    original = pipe.unet.get_submodule(path.removeprefix("unet.")).processor
    handle = patcher.apply([Record(("output", 2), first), Record(("output", 2, 0), second)])
    assert handle.replaced_processors == [path, path]
    outer = pipe.unet.get_submodule(path.removeprefix("unet.")).processor
    assert isinstance(outer, Recorder) and isinstance(outer.inner, Recorder) and outer.inner.inner is original

    images = pipe(**run, generator=torch.Generator().manual_seed(1)).images
    assert (images == baseline).all()  # recording changes nothing
    timesteps = pipe.scheduler.timesteps.tolist()
    assert [entry[0] for entry in first] == [0, 1, 2]
    assert [entry[1] for entry in first] == pytest.approx(timesteps)
    assert [entry[2] for entry in first] == pytest.approx(pipe.scheduler.sigmas[:3].tolist())
    assert {entry[3] for entry in first} == {(1, 0)}  # CFG on: [uncond, cond]
    assert {entry[4] for entry in first} == {2}
    assert second == first

    first.clear()
    pipe(**run, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert {entry[3] for entry in first} == {(0,)}  # no CFG: one cond chunk
    handle.remove()
    assert pipe.unet.get_submodule(path.removeprefix("unet.")).processor is original
    assert not pipe.unet._forward_pre_hooks  # the state hook is gone too
