"""Tiny random-weight pipelines: build, save, reload offline, generate deterministically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")

from farm.errors import UserError  # noqa: E402
from farm.tiny_models import CROSS_ATTENTION_DIM, FAMILIES, build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "svd": "StableVideoDiffusionPipeline",
}


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1, also for a huggingface_hub that another test module imported first."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def reload(path: Path) -> Any:
    """The pipeline in ``path`` through diffusers' generic loader, as a user would load it."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, family: str, seed: int) -> Any:
    """One tiny generation on CPU as a numpy array: (1, 64, 64, 3) images, (1, 4, 64, 64, 3) video."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        if family == "svd":
            from PIL import Image

            pixels = np.random.default_rng(7).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            out = pipe(
                Image.fromarray(pixels),
                height=64,
                width=64,
                num_frames=4,
                num_inference_steps=2,
                decode_chunk_size=2,
                generator=generator,
                output_type="np",
            )
            return np.asarray(out.frames)
        out = pipe(
            "a photo of a cat",
            height=64,
            width=64,
            num_inference_steps=2,
            generator=generator,
            output_type="np",
        )
        return np.asarray(out.images)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, _offline: None) -> dict[str, Path]:
    """Each family built once (seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(built: dict[str, Path]) -> dict[str, Any]:
    """Each family reloaded once from its folder."""
    return {family: reload(path) for family, path in built.items()}


def weights(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_reloads_as_the_family_pipeline(family: str, built: dict[str, Path], pipelines: dict[str, Any]) -> None:
    folder = built[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    assert type(pipelines[family]).__name__ == PIPELINES[family]
    marker = json.loads((folder / "farm_tiny.json").read_text())
    assert marker["family"] == family and marker["seed"] == 0
    assert {"diffusers", "transformers", "torch"} <= marker.keys()
    assert weights(folder), "no safetensors written"
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_finite_output_of_the_right_shape(family: str, pipelines: dict[str, Any]) -> None:
    out = generate(pipelines[family], family, seed=1)
    expected = (1, 4, 64, 64, 3) if family == "svd" else (1, 64, 64, 3)
    assert out.shape == expected
    assert np.isfinite(out).all()
    assert out.std() > 0  # not a constant image


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_deterministic_per_seed(family: str, pipelines: dict[str, Any]) -> None:
    pipe = pipelines[family]
    first, again, other = (generate(pipe, family, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_writes_identical_weights(family: str, built: dict[str, Path], tmp_path: Path) -> None:
    same = weights(build_tiny_model(family, tmp_path / "same", seed=0))
    original = weights(built[family])
    assert same.keys() == original.keys()
    assert all(same[name] == original[name] for name in original)
    other = weights(build_tiny_model(family, tmp_path / "other", seed=1))
    assert all(other[name] != original[name] for name in original)


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_attention_widths(family: str, pipelines: dict[str, Any]) -> None:
    unet = pipelines[family].unet
    assert unet.config.cross_attention_dim == CROSS_ATTENTION_DIM[family]
    assert list(unet.config.block_out_channels) == [32, 64]
    attn2 = {name: module for name, module in unet.named_modules() if name.endswith("attn2")}
    assert attn2
    assert {module.to_k.in_features for module in attn2.values()} == {CROSS_ATTENTION_DIM[family]}


def test_sdxl_attentions_have_two_transformer_blocks(pipelines: dict[str, Any]) -> None:
    names = {name for name, _ in pipelines["sdxl"].unet.named_modules()}
    attentions = {n for n in names if n.endswith(".attentions.0") or n.endswith(".attentions.1")}
    assert attentions
    for attention in attentions:
        assert f"{attention}.transformer_blocks.1" in names
        assert f"{attention}.transformer_blocks.2" not in names
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2" in names


def test_svd_unet_has_temporal_and_spatial_blocks(pipelines: dict[str, Any]) -> None:
    names = [name for name, _ in pipelines["svd"].unet.named_modules()]
    assert any(".temporal_transformer_blocks.0" in n for n in names)
    assert any(".transformer_blocks.0" in n for n in names)
    assert pipelines["svd"].image_encoder.config.image_size == 224


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tokenizers_split_real_words(family: str, pipelines: dict[str, Any]) -> None:
    pipe = pipelines[family]
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if family == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for tokenizer, encoder in pairs:
        ids = tokenizer("a photo of a cat").input_ids
        assert len(set(ids)) > 4, ids  # start, end and several word pieces
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer("a dog").input_ids != tokenizer("a cat").input_ids
        assert len(tokenizer) <= encoder.config.vocab_size
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        padded = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
        assert len(padded) == 77


def test_tokenizer_files_are_written(built: dict[str, Path]) -> None:
    for folder in (built["sd15"] / "tokenizer", built["sdxl"] / "tokenizer_2"):
        vocab = json.loads((folder / "vocab.json").read_text())
        assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab and "a</w>" in vocab
        assert (folder / "merges.txt").read_text().startswith("#version")


def test_unknown_family_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="sd3"):
        build_tiny_model("sd3", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_import_stays_light() -> None:
    code = "import sys, farm.tiny_models, farm.cli.models_cmd; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from farm.cli import models_cmd

    app = typer.Typer()
    app.add_typer(models_cmd.app, name="models")  # as `farm models`
    runner = CliRunner()
    folder = tmp_path / "svd"
    first = runner.invoke(app, ["models", "tiny", "svd", str(folder), "--seed", "3"])
    assert first.exit_code == 0, first.output
    assert "MB" in first.output and (folder / "farm_tiny.json").is_file()
    refused = runner.invoke(app, ["models", "tiny", "sd15", str(folder)])
    assert refused.exit_code == 2 and "not empty" in " ".join(refused.output.split())
    forced = runner.invoke(app, ["models", "tiny", "svd", str(folder), "--seed", "4", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((folder / "farm_tiny.json").read_text())["seed"] == 4
    bad = runner.invoke(app, ["models", "tiny", "sd3", str(tmp_path / "bad")])
    assert isinstance(bad.exception, UserError) and not (tmp_path / "bad").exists()
