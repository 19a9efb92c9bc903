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
    from farm.worker.runtime import JobMemo

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
