"""The pinned-model cache on real tiny pipelines: load once, hit after, LRU under a budget."""

from __future__ import annotations

import json

import pytest

from farm.errors import ConfigError, UserError
from farm.worker.devices import resolve_placement
from farm.worker.model_cache import ModelCache, ModelLoadError, model_fingerprint


def test_load_once_then_hit(tiny_models) -> None:
    cache = ModelCache(resolve_placement("cpu"), budget_bytes=1 << 30)
    first = cache.get(str(tiny_models["sd15"]), "sd15")
    second = cache.get(str(tiny_models["sd15"]), "sd15")
    assert first is second and first.pipeline is second.pipeline
    assert (cache.loads, cache.hits) == (1, 1)
    assert first.size_bytes > 0 and len(first.model_hash) == 64
    assert first.model_hash == model_fingerprint(tiny_models["sd15"])


def test_lru_eviction_under_budget(tiny_models) -> None:
    placement = resolve_placement("cpu")
    probe = ModelCache(placement, 1 << 30)
    sd15_bytes = probe.get(str(tiny_models["sd15"]), "sd15").size_bytes
    cache = ModelCache(placement, budget_bytes=sd15_bytes + 1)  # room for one model only
    cache.get(str(tiny_models["sd15"]), "sd15")
    cache.get(str(tiny_models["sdxl"]), "sdxl")
    assert cache.resident() == [(str(tiny_models["sdxl"]), "sdxl")]
    assert cache.evictions == 1
    cache.get(str(tiny_models["sd15"]), "sd15")
    assert cache.loads == 3 and cache.hits == 0


def test_bad_models_are_clear_user_errors(tiny_models, tmp_path) -> None:
    cache = ModelCache(resolve_placement("cpu"), 1 << 30)
    with pytest.raises(ModelLoadError, match="no such folder"):
        cache.get(str(tmp_path / "missing"), "sd15")
    with pytest.raises(ModelLoadError, match="not a StableDiffusionXLPipeline"):
        cache.get(str(tiny_models["sd15"]), "sdxl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        cache.get(str(tmp_path / "empty"), "sd15")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError):
        cache.get(str(broken), "sd15")
    assert issubclass(ModelLoadError, UserError) and cache.loads == 0


def test_placement() -> None:
    assert resolve_placement("auto", "auto").device in {"cpu", "cuda"}
    assert resolve_placement("cpu", "auto").dtype_name == "float32"
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        resolve_placement("cpu", "float16")


def test_job_memo_keeps_the_most_recent_entries() -> None:
    from farm.worker.resources import JobMemo

    memo = JobMemo(limit=2)
    calls: list[str] = []

    def make(value: str):
        return lambda: calls.append(value) or value

    assert memo.remember("a", make("a")) == "a"
    assert memo.remember("a", make("again")) == "a"  # computed once
    memo.remember("b", make("b"))
    memo.remember("a", make("x"))  # a is now the most recent
    memo.remember("c", make("c"))  # evicts b, the least recently used
    assert list(memo) == ["a", "c"] and calls == ["a", "b", "c"]


def test_a_missing_model_path_names_the_host_and_the_folder_it_was_resolved_against(tmp_path, monkeypatch) -> None:
    import socket

    monkeypatch.chdir(tmp_path)
    cache = ModelCache(resolve_placement("cpu"), 1 << 30)
    with pytest.raises(ModelLoadError) as info:
        cache.get("./models/sd15", "sd15")
    assert str(info.value) == (
        f"model './models/sd15': no such folder on worker host {socket.gethostname()} (relative paths are "
        f"resolved against this worker's working folder {tmp_path}: {tmp_path / 'models' / 'sd15'})"
    )
    with pytest.raises(ModelLoadError, match=r"'~/no-such-farm-model': no such folder on worker host .* \(~ is the"):
        cache.get("~/no-such-farm-model", "sd15")
    with pytest.raises(ModelLoadError, match=rf"model '{tmp_path}/gone': no such folder on worker host \S+$"):
        cache.get(str(tmp_path / "gone"), "sd15")


def test_a_tilde_model_path_is_the_worker_users_home(tiny_models, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tiny_models["sd15"].parent))
    cache = ModelCache(resolve_placement("cpu"), 1 << 30)
    loaded = cache.get(f"~/{tiny_models['sd15'].name}", "sd15")
    assert loaded.model_hash == model_fingerprint(tiny_models["sd15"])


def test_a_hub_id_without_network_says_the_model_is_not_here_and_how_to_provide_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = ModelCache(resolve_placement("cpu"), 1 << 30)
    with pytest.raises(ModelLoadError) as info:
        cache.get("farm-tests/not-on-this-machine", "sd15")
    message = str(info.value)
    assert message.startswith("model 'farm-tests/not-on-this-machine' is not on this machine: it is a Hugging Face")
    assert "hf download farm-tests/not-on-this-machine --local-dir DIR" in message
    assert "set the job's model to that folder" in message and "local_files_only" not in message


def test_a_missing_component_path_names_its_field_and_host(tmp_path, monkeypatch) -> None:
    import socket

    from farm.worker.components import load_component

    monkeypatch.chdir(tmp_path)
    placement = resolve_placement("cpu")
    with pytest.raises(ModelLoadError) as info:
        load_component("./adapters/ip.safetensors", "ip_adapter", placement)
    assert str(info.value).startswith(
        f"identity.adapter './adapters/ip.safetensors': no such file on worker host {socket.gethostname()} "
        f"(relative paths are resolved against this worker's working folder {tmp_path}"
    )
    with pytest.raises(ModelLoadError, match=r"^identity\.image_encoder '/nowhere/enc': no such folder on worker"):
        load_component("/nowhere/enc", "clip_vision", placement)


@pytest.fixture(scope="module")
def tiny_components(tmp_path_factory) -> dict[str, str]:
    """Two tiny IP-Adapters (one with its image encoder), a ControlNet and a face pack, by kind."""
    pytest.importorskip("diffusers")
    from farm.tiny_components import build_tiny_controlnet, build_tiny_face_pack, build_tiny_ip_adapter

    root = tmp_path_factory.mktemp("components")
    plain = build_tiny_ip_adapter("sd15", root / "plain")
    plus = build_tiny_ip_adapter("sd15", root / "plus", plus=True, seed=1, image_encoder=False)
    return {
        "ip_adapter": str(plain / "ip-adapter.safetensors"),
        "ip_adapter_plus": str(plus / "ip-adapter.safetensors"),
        "clip_vision": str(plain / "image_encoder"),
        "controlnet": str(build_tiny_controlnet("sd15", root / "controlnet")),
        "face_analysis": str(build_tiny_face_pack(root / "antelopev2")),
    }


def _component_resources(tmp_path, **worker):
    from farm.settings import FarmSettings
    from farm.worker.resources import WorkerResources

    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data", worker={"device": "cpu", **worker})
    return WorkerResources.create(settings, name="components")


def test_component_sizes_count_their_weights(tiny_components, tmp_path) -> None:
    """What each kind of component counts against ``worker.component_cache_mb``: its tensors, or
    for a face pack (weights in ONNX Runtime) its .onnx files."""
    from pathlib import Path

    from farm.worker.components import component_bytes

    with _component_resources(tmp_path, component_cache_mb=16) as res:
        cache = res.component_cache()
        assert (cache.budget_bytes, cache.name) == (16 << 20, "component cache")
        adapter = cache.get(tiny_components["ip_adapter"], "ip_adapter")
        tensors = [*adapter.pipeline.projection.parameters(), *(t for kv in adapter.pipeline.layers for t in kv)]
        assert adapter.size_bytes == sum(t.numel() * t.element_size() for t in tensors) > 0
        encoder = cache.get(tiny_components["clip_vision"], "clip_vision")
        module = encoder.pipeline
        expected = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        assert encoder.size_bytes == expected > 0
        controlnet = cache.get(tiny_components["controlnet"], "controlnet")
        assert controlnet.size_bytes > 0
        pytest.importorskip("insightface")
        faces = cache.get(tiny_components["face_analysis"], "face_analysis/cpu")
        onnx = sum(f.stat().st_size for f in Path(tiny_components["face_analysis"]).glob("*.onnx"))
        assert faces.size_bytes == onnx > 0
        assert cache.resident_bytes == sum(m.size_bytes for m in (adapter, encoder, controlnet, faces))
        assert cache.evictions == 0  # all of it fits in 16 MiB
        torch = pytest.importorskip("torch")
        assert component_bytes(torch.zeros(4, 8)) == 4 * 8 * 4


def test_component_cache_evicts_the_least_recently_used_past_its_budget(tiny_components, tmp_path, caplog) -> None:
    """A budget that fits one component: loading a second evicts the first (with the model cache's
    counters and log line), and the one being handed out is never evicted, even alone over budget."""
    import logging

    first, second = tiny_components["ip_adapter"], tiny_components["ip_adapter_plus"]
    with _component_resources(tmp_path) as res:
        cache = res.component_cache()
        assert cache.budget_bytes == 8_000 << 20  # the default worker.component_cache_mb
        size = cache.get(first, "ip_adapter").size_bytes
        cache.budget_bytes = size + 1  # room for the first adapter only
        caplog.set_level(logging.INFO, logger="farm.worker.model_cache")
        cache.get(first, "ip_adapter")
        cache.get(second, "ip_adapter")
        assert cache.resident() == [(second, "ip_adapter")]
        assert (cache.loads, cache.hits, cache.evictions) == (2, 1, 1)
        evicted = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
        assert len(evicted) == 1
        assert evicted[0].startswith(f"component cache: evicted ip_adapter:{first} (")
        assert evicted[0].endswith(f"to stay within its {(size + 1) / 2**20:.1f} MiB budget")

        cache.budget_bytes = 1  # smaller than any component
        cache.get(first, "ip_adapter")  # the second goes; the first stays though over budget
        assert cache.resident() == [(first, "ip_adapter")]
        assert cache.get(first, "ip_adapter").size_bytes > cache.budget_bytes
        stats = cache.stats()
        assert (stats["loads"], stats["evictions"], stats["resident"]) == (3, 2, [f"ip_adapter:{first}"])


def test_component_cache_budget_is_a_setting() -> None:
    from farm.settings import FarmSettings

    assert FarmSettings(_env_file=None).worker.component_cache_mb == 8_000
    assert FarmSettings(_env_file=None, worker={"component_cache_mb": 512}).worker.component_cache_mb == 512
    with pytest.raises(ValueError, match="component_cache_mb"):
        FarmSettings(_env_file=None, worker={"component_cache_mb": 0})
