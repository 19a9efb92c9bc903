"""LoRA stacks per job (``loras: [{model, weight}]``): the spec, the worker loading files into the
resident pipeline with diffusers' PEFT integration, switching per job, combining with the other
patches, and the base model coming back bit-exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from farm.job_spec import SpecError
from farm.specs import parse_spec
from tests.fixtures.farm import text_job
from tests.test_specs import problems_of

BASE = {"model": "a/b", "family": "sd15", "prompts": ["x"], "seeds": [1]}
HEX = "0123456789abcdef" * 4
ONE = {"prompts": ["a red cube"], "count": 1, "steps": 2}  # one item: these jobs compare models, not shards


# -- the spec ------------------------------------------------------------------------------------
def test_loras_round_trip_and_registry_refs() -> None:
    loras = [
        {"model": "/models/loras/ink.safetensors", "weight": 0.8},
        {"model": "./loras/folder"},
        {"model": "registry:ink"},
        {"model": "registry:ink-style@2"},
        {"model": f"registry:ink_style.x@sha256:{HEX}", "weight": -1.5},
    ]
    spec = parse_spec({**BASE, "loras": loras})
    assert [lora.weight for lora in spec.loras] == [0.8, 1.0, 1.0, 1.0, -1.5]
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert parse_spec(BASE).loras == []


@pytest.mark.parametrize(
    ("loras", "field", "reason"),
    [
        ([{"model": "/l/a.safetensors", "weight": 10.5}], "loras[0].weight", "less than or equal to 10"),
        ([{"model": "/l/a.ckpt"}], "loras[0].model", "only from .safetensors"),
        ([{"model": "loras/a.safetensors"}], "loras[0].model", "registry:NAME[@VERSION] or a local path"),
        ([{"model": "registry:a@sha256:ABC"}], "loras[0].model", "is not a SHA-256 digest"),
        ([{"model": "registry:../x"}], "loras[0].model", "name: '../x' is not allowed"),
        ([{"model": "registry:ink@v2"}], "loras[0].model", "'v2' is not a version number"),
        ([{"model": "/l/a\n.safetensors"}], "loras[0].model", "control characters"),
        ([{"model": "/a"}, {"model": "/b"}, {"model": "/a"}], "loras[2].model", "duplicate of loras[0].model"),
        ([{"model": f"/l/{i}.safetensors"} for i in range(9)], "loras", "at most 8"),
        ([{"model": "/l/a.safetensors", "strength": 1.0}], "loras[0].strength", "unknown field"),
    ],
)
def test_invalid_loras_name_the_field(loras: list, field: str, reason: str) -> None:
    problems = dict(problems_of({**BASE, "loras": loras}))
    assert field in problems and reason in problems[field], problems


def test_video_jobs_do_not_take_loras() -> None:
    video = {"kind": "temporal_video", "model": "a/b", "family": "svd", "seeds": [1]}
    video["images"] = [{"key": "inputs/a.png", "sha256": "0" * 64}]
    assert dict(problems_of({**video, "loras": [{"model": "/l/a.safetensors"}]}))["loras"] == "unknown field"


def test_lora_file_finds_the_weights(tmp_path: Path) -> None:
    from farm.worker.lora_stack import LoraUnavailable, lora_file

    one = tmp_path / "one"
    one.mkdir()
    (one / "style.safetensors").write_bytes(b"x")
    assert lora_file(str(one)) == one / "style.safetensors"
    (one / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert lora_file(str(one)).name == "pytorch_lora_weights.safetensors"
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.safetensors").write_bytes(b"x")
    (two / "b.safetensors").write_bytes(b"x")
    with pytest.raises(LoraUnavailable, match=r"must hold one \.safetensors file"):
        lora_file(str(two))
    with pytest.raises(LoraUnavailable, match="no such file or folder on worker host"):
        lora_file(str(tmp_path / "missing.safetensors"))
    with pytest.raises(LoraUnavailable, match="a registry reference needs a worker's model cache"):
        lora_file("registry:ink@2")


# -- the worker ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("peft")
    from farm.tiny_components import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {name: build_tiny_lora("sd15", root / name, seed=seed) for name, seed in (("ink", 1), ("clay", 2))}


def _run(worker: Any, job: dict[str, Any]) -> list[tuple[dict[str, Any], bytes]]:
    job_id, outcomes = worker.run(job)
    assert set(outcomes) == {"succeeded"}, outcomes
    return worker.outputs(job_id)


def _images(outputs: list[tuple[dict[str, Any], bytes]]) -> list[bytes]:
    return [image for _, image in outputs]


def _render(pipe: Any) -> Any:
    import torch

    generator = torch.Generator().manual_seed(5)
    args = {"num_inference_steps": 2, "width": 64, "height": 64, "guidance_scale": 1.0, "output_type": "np"}
    return pipe(["a red cube"], generator=generator, **args).images


def _reference(model: Path, stack: list[tuple[Path, float]], scheduler: Any) -> Any:
    """A fresh pipeline with the LoRAs loaded by diffusers' own ``load_lora_weights`` and
    ``set_adapters``. Where the installed transformers refuses this PEFT version for text-encoder
    adapters, the text-encoder half of each file is merged into the weights by hand instead
    (``W += weight * up @ down``; the tiny files have no alphas)."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    from farm.worker.lora_stack import _transformers_refuses_peft

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.scheduler = type(scheduler).from_config(scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    by_hand = _transformers_refuses_peft()
    for i, (path, weight) in enumerate(stack):
        weights = load_file(path)
        unet_only = {k: v for k, v in weights.items() if k.startswith("unet.")}
        pipe.load_lora_weights(unet_only if by_hand else weights, adapter_name=f"ref{i}")
        if by_hand:
            with torch.no_grad():
                for name, module in pipe.text_encoder.named_modules():
                    down = weights.get(f"text_encoder.{name}.lora_linear_layer.down.weight")
                    if down is not None:
                        module.weight += weight * weights[f"text_encoder.{name}.lora_linear_layer.up.weight"] @ down
    pipe.set_adapters([f"ref{i}" for i in range(len(stack))], adapter_weights=[w for _, w in stack])
    return pipe


def _base_weights(pipe: Any) -> dict[str, Any]:
    """The UNet's and text encoder's own weights, under their plain names (PEFT wraps a layer's
    weights under ``base_layer``), LoRA matrices left out."""
    out = {}
    for component in ("unet", "text_encoder"):
        for name, tensor in getattr(pipe, component).state_dict().items():
            if ".lora_" not in name:
                out[f"{component}.{name.replace('.base_layer.', '.')}"] = tensor
    return out


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_lora_jobs_match_diffusers_and_the_base_comes_back_exactly(tiny_models, in_process_worker, loras) -> None:
    import diffusers
    import torch

    model = tiny_models["sd15"]
    worker = in_process_worker(lora_cache_size=1)
    base = _run(worker, text_job(model, **ONE, output_prefix="base"))
    pipe = worker.res.model_cache().get(str(model), "sd15").pipeline
    base_render = _render(pipe)

    one = _run(worker, text_job(model, **ONE, output_prefix="one", loras=[{"model": str(loras["ink"]), "weight": 0.8}]))
    reference = _reference(model, [(loras["ink"], 0.8)], pipe.scheduler)
    assert float(abs(_render(pipe) - _render(reference)).max()) <= 1e-5
    params = one[0][0]
    assert params["loras"] == [{"model": str(loras["ink"]), "weight": 0.8, "sha256": params["loras"][0]["sha256"]}]
    assert params["patches_fingerprint"] != base[0][0]["patches_fingerprint"]
    assert all(a != b for a, b in zip(_images(base), _images(one), strict=True))

    two = [{"model": str(loras["ink"].parent), "weight": 0.6}, {"model": str(loras["clay"]), "weight": -0.4}]
    _run(worker, text_job(model, **ONE, output_prefix="two", loras=two))
    reference = _reference(model, [(loras["ink"], 0.6), (loras["clay"], -0.4)], pipe.scheduler)
    assert float(abs(_render(pipe) - _render(reference)).max()) <= 1e-5
    assert worker.res.model_cache().get(str(model), "sd15").loras.loads == 2  # ink stayed loaded

    after = _run(worker, text_job(model, **ONE, output_prefix="after"))
    assert _images(after) == _images(base) and "loras" not in after[0][0]
    assert after[0][0]["patches_fingerprint"] == base[0][0]["patches_fingerprint"]
    assert (_render(pipe) == base_render).all()
    fresh = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    now, then = _base_weights(pipe), _base_weights(fresh)
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in then)

    _run(worker, text_job(model, **ONE, output_prefix="clay", loras=[{"model": str(loras["clay"]), "weight": 1.0}]))
    adapters = worker.res.model_cache().get(str(model), "sd15").loras
    assert list(adapters.loaded) == [adapters.active[0].adapter_name]  # the cache holds one: ink was evicted


def test_a_registry_lora_is_pinned_at_submit_and_renders_as_its_file(tiny_models, in_process_worker, loras) -> None:
    """``registry:NAME`` in ``loras`` resolves (at submit, with the model's own resolver) to the
    exact manifest, which the worker materialises into its host cache: same bytes, same images."""
    from farm.model_registry import pin_spec_model, push_model
    from farm.specs import parse_spec

    model = tiny_models["sd15"]
    worker = in_process_worker()
    pushed = push_model(worker.res.store, loras["ink"].parent, "ink", "sd15")
    by_path = _run(worker, text_job(model, **ONE, output_prefix="path", loras=[{"model": str(loras["ink"])}]))
    spec = pin_spec_model(
        parse_spec(text_job(model, **ONE, output_prefix="reg", loras=[{"model": "registry:ink"}])), worker.res.store
    )
    assert spec.loras[0].model == f"registry:ink@sha256:{pushed.ref.digest}"
    by_registry = _run(worker, spec.model_dump(mode="json"))
    assert _images(by_registry) == _images(by_path)
    assert by_registry[0][0]["loras"][0]["sha256"] == by_path[0][0]["loras"][0]["sha256"]
    with pytest.raises(SpecError, match="no model 'nothing' in the registry"):
        pin_spec_model(parse_spec(text_job(model, **ONE, loras=[{"model": "registry:nothing"}])), worker.res.store)
    with pytest.raises(SpecError, match="registry:ink is a lora: it goes in a job's loras"):
        pin_spec_model(parse_spec(text_job("registry:ink", **ONE)), worker.res.store)
    xl = text_job(tiny_models["sdxl"], family="sdxl", **ONE, loras=[{"model": "registry:ink"}])
    with pytest.raises(SpecError, match="is a sd15 model, but the job's family is sdxl"):
        pin_spec_model(parse_spec(xl), worker.res.store)


def test_loras_with_multipliers_and_sag_unpatch_exactly(tiny_models, in_process_worker, loras) -> None:
    model = tiny_models["sd15"]
    worker = in_process_worker()
    stack = [{"model": str(loras["ink"]), "weight": 0.9}]
    multiply = [{"type": "unet_self_attention_multiply", "q": 1.3, "out": 0.8}, {"type": "clip_attention_multiply"}]
    multiply[1]["v"] = 1.2
    outputs = {
        "multiply": _run(worker, text_job(model, **ONE, output_prefix="m", patches=multiply)),
        "lora": _run(worker, text_job(model, **ONE, output_prefix="l", loras=stack)),
        "both": _run(worker, text_job(model, **ONE, output_prefix="b", loras=stack, patches=multiply)),
        "sag": _run(worker, text_job(model, **ONE, output_prefix="s", loras=stack, sag={"scale": 0.9})),
        "multiply again": _run(worker, text_job(model, **ONE, output_prefix="m2", patches=multiply)),
        "lora again": _run(worker, text_job(model, **ONE, output_prefix="l2", loras=stack)),
    }
    images = {name: _images(out) for name, out in outputs.items()}
    assert len({tuple(v) for v in images.values()}) == 4
    assert images["multiply again"] == images["multiply"] and images["lora again"] == images["lora"]
    fingerprints = {name: out[0][0]["patches_fingerprint"] for name, out in outputs.items()}
    assert len(set(fingerprints.values())) == 4
    assert outputs["sag"][0][0]["sag"]["scale"] == 0.9 and outputs["both"][0][0]["patches"][0]["q"] == 1.3


def test_lora_with_an_ip_adapter_identity(tiny_models, in_process_worker, loras, tmp_path: Path) -> None:
    from farm.tiny_components import build_tiny_ip_adapter
    from tests.test_face_identity import _face, identity_job

    adapter = build_tiny_ip_adapter("sd15", tmp_path / "adapter")
    refs = [_face(tmp_path, "a.png", (180, 120, 90))]
    worker = in_process_worker()
    model = tiny_models["sd15"]

    def job(prefix: str, **extra: Any) -> dict[str, Any]:
        return identity_job(model, adapter, refs, prompts=["a portrait"], steps=2, output_prefix=prefix, **extra)

    plain = _run(worker, job("ip"))
    with_lora = _run(worker, job("ipl", loras=[{"model": str(loras["ink"])}]))
    again = _run(worker, job("ip2"))
    assert with_lora[0][0]["loras"][0]["weight"] == 1.0 and with_lora[0][0]["identity"]["method"] == "ip_adapter"
    assert all(a != b for a, b in zip(_images(plain), _images(with_lora), strict=True))
    assert _images(again) == _images(plain)


def test_sdxl_lora_on_both_text_encoders(tiny_models, in_process_worker, tmp_path: Path) -> None:
    from farm.tiny_components import build_tiny_lora

    lora = build_tiny_lora("sdxl", tmp_path / "xl")
    model = tiny_models["sdxl"]
    worker = in_process_worker()
    base = _run(worker, text_job(model, "sdxl", output_prefix="xl", **ONE))
    styled = _run(worker, text_job(model, "sdxl", output_prefix="xll", loras=[{"model": str(lora)}], **ONE))
    assert _images(styled) != _images(base)
    pipe = worker.res.model_cache().get(str(model), "sdxl").pipeline
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert _images(_run(worker, text_job(model, "sdxl", output_prefix="xl2", **ONE))) == _images(base)


def test_a_corrupt_lora_fails_its_job_and_the_worker_keeps_serving(farm_factory, tiny_models, tmp_path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    farm = farm_factory()  # SQLite + local folder + filesystem broker, a real worker process
    farm.start_worker(["farm.control", "farm.gpu.sd15"])
    model = tiny_models["sd15"]
    with farm.client() as client:
        bad = client.submit(text_job(model, **ONE, loras=[{"model": str(corrupt), "weight": 0.5}]))
        summary = client.wait(bad, timeout=120)
        assert summary["status"] == "failed", summary
        error = summary["shards"][0]["error"]
        assert f"LoRA {str(corrupt)!r}: not a readable .safetensors file" in error, error
        good = client.submit(text_job(model, **ONE))
        assert client.wait(good, timeout=120)["status"] == "succeeded"


def test_lora_switch_bench_runs(tmp_path: Path) -> None:
    from bench.lora_switch import main

    out = tmp_path / "lora.json"
    (result,) = main(["--family", "sd15", "--repeats", "1", "--json", str(out)])
    assert out.exists() and result["family"] == "sd15" and result["lora_file_bytes"] > 0
    assert all(result[f"{name}_s"] > 0 for name in ("reload", "cold", "switch", "off", "step_base", "step_lora"))


def test_a_lora_file_replaced_in_place_leaves_loaded_adapters_alone(tiny_models, loras, tmp_path: Path) -> None:
    """Adapters hold copies of the file's bytes, never a memory map: a file overwritten in place
    (same path, same inode) is a new LoRA by digest, and the one loaded before is unchanged."""
    import shutil

    from farm.loras import LoraSpec
    from farm.worker.devices import Placement
    from farm.worker.lora_stack import LoraAdapters, LoraLayer
    from farm.worker.model_cache import load_pipeline

    pipe, _ = load_pipeline(str(tiny_models["sd15"]), "sd15", Placement("cpu", "float32"))
    pipe.set_progress_bar_config(disable=True)
    adapters = LoraAdapters(pipe, capacity=4)
    live = tmp_path / "live.safetensors"

    def switch(path: Path) -> list[LoraLayer]:
        stack = adapters.resolve([LoraSpec(model=str(path), weight=1.0)])
        adapters.switch(stack)
        return stack

    shutil.copy(loras["ink"], live)
    first = switch(live)
    ink = _render(pipe)
    shutil.copy(loras["clay"], live)  # rewrites the same inode
    assert switch(live)[0].sha256 != first[0].sha256
    assert switch(loras["ink"])[0].adapter_name == first[0].adapter_name and adapters.loads == 2
    assert (_render(pipe) == ink).all()
