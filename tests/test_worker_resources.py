"""What a worker process holds is released at its shutdown: :class:`WorkerResources` as a context
manager, ``close()`` once (threads, metrics server, pinned models and components, memory, store,
database), Celery's ``worker_shutdown`` closing it, and a real worker process sent SIGTERM."""

from __future__ import annotations

import gc
import logging
import signal
import subprocess
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from farm.settings import FarmSettings
from farm.worker.resources import ResourcesClosed, WorkerResources
from storage.db import make_engine, make_session_factory, session_scope
from tests.fixtures.farm import text_job
from tests.fixtures.services import free_port

CLOSED = "worker resources closed: "


class Held:
    """A context manager that records when it was entered and exited (a heartbeat stand-in)."""

    def __init__(self, events: list[str], name: str) -> None:
        self.events, self.name = events, name

    def __enter__(self) -> Held:
        self.events.append(f"enter {self.name}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.events.append(f"exit {self.name}")


class Metrics:
    """A stand-in for WorkerMetrics with a server to stop."""

    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.events, self.fail, self.server = events, fail, object()

    def close(self) -> None:
        self.events.append("metrics closed")
        if self.fail:
            raise OSError("the metrics server would not stop")
        self.server = None


def _resources(tmp_path: Path, **worker: Any) -> WorkerResources:
    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data", worker={"device": "cpu", **worker})
    return WorkerResources.create(settings, name="closing")


def _closed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(CLOSED)]


def test_close_releases_everything_once_in_order(tmp_path, caplog, monkeypatch) -> None:
    events: list[str] = []
    res = _resources(tmp_path)
    disposed: list[bool] = []
    dispose = res.engine.dispose
    monkeypatch.setattr(res.engine, "dispose", lambda: disposed.append(True) or dispose())
    assert res.hold(Held(events, "heartbeat"), "heartbeat").name == "heartbeat"
    res.hold(Held(events, "reconciler"), "reconciler")
    res.metrics = Metrics(events)
    res.memo.remember("embeddings", lambda: [1.0])
    caplog.set_level(logging.INFO, logger="farm.worker.resources")

    res.close()
    res.close()  # idempotent: nothing runs twice
    with res:  # and leaving the context of a closed one does nothing either
        pass

    assert events == ["enter heartbeat", "enter reconciler", "exit reconciler", "exit heartbeat", "metrics closed"]
    assert res.closed and disposed == [True] and len(res.memo) == 0
    assert _closed_lines(caplog) == [
        f"{CLOSED}closing: heartbeat and reconciler stopped; metrics server stopped; job memo: 1 entry dropped; "
        "database engine disposed"
    ]
    with pytest.raises(ResourcesClosed, match="shutting down"):
        res.model_cache()
    with pytest.raises(ResourcesClosed):
        res.component_cache()
    with pytest.raises(ResourcesClosed):
        res.hold(Held(events, "late"), "late")
    assert "enter late" not in events


def test_the_context_manager_closes_on_an_exception(tmp_path, caplog) -> None:
    events: list[str] = []
    caplog.set_level(logging.INFO, logger="farm.worker.resources")
    with pytest.raises(RuntimeError, match="preload failed"), _resources(tmp_path) as res:
        res.hold(Held(events, "heartbeat"), "heartbeat")
        raise RuntimeError("preload failed")
    assert res.closed and events == ["enter heartbeat", "exit heartbeat"]
    assert len(_closed_lines(caplog)) == 1


def test_a_failing_step_does_not_stop_the_others(tmp_path, caplog) -> None:
    events: list[str] = []
    res = _resources(tmp_path)
    res.hold(Held(events, "heartbeat"), "heartbeat")
    res.metrics = Metrics(events, fail=True)
    caplog.set_level(logging.INFO, logger="farm.worker.resources")
    res.close()
    assert events == ["enter heartbeat", "exit heartbeat", "metrics closed"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["worker closing: closing metrics server failed: OSError: the metrics server would not stop"]
    assert _closed_lines(caplog) == [f"{CLOSED}closing: heartbeat stopped; database engine disposed"]


def test_close_drops_the_pinned_models_and_components(tmp_path, tiny_models, caplog) -> None:
    """The caches let go of their pipelines and components: nothing keeps them alive after close."""
    from farm.tiny_components import build_tiny_ip_adapter

    adapter = build_tiny_ip_adapter("sd15", tmp_path / "adapter")
    res = _resources(tmp_path)
    pipeline = weakref.ref(res.model_cache().get(str(tiny_models["sd15"]), "sd15").pipeline)
    encoder = weakref.ref(res.component_cache().get(str(adapter / "image_encoder"), "clip_vision").pipeline)
    res.component_cache().get(str(adapter / "ip-adapter.safetensors"), "ip_adapter")
    gc.collect()
    assert pipeline() is not None and encoder() is not None
    caplog.set_level(logging.INFO, logger="farm.worker.resources")
    res.close()
    assert pipeline() is None and encoder() is None  # collected by close itself (no gc here)
    assert res.cache.resident() == [] and res.components.resident() == []
    assert _closed_lines(caplog) == [
        f"{CLOSED}closing: component cache: 2 pinned components dropped; model cache: 1 pinned model dropped; "
        "memory released (cpu); database engine disposed"
    ]


def test_on_cuda_close_empties_the_cuda_cache(tmp_path, monkeypatch) -> None:
    """The device is chosen at run time: a cache placed on CUDA gets the CUDA allocator emptied
    (faked here: this test runs without a GPU), a CPU one never touches CUDA (above)."""
    torch = pytest.importorskip("torch")
    from farm.worker.devices import Placement
    from farm.worker.model_cache import ModelCache

    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    res = _resources(tmp_path)
    res.cache = ModelCache(Placement("cuda", "float16"), 1 << 30, loader=lambda *a: (object(), "hash"))
    res.cache.get("a", "sd15")
    res.close()
    assert emptied == [True] and res.cache.resident() == []


def test_celery_worker_shutdown_signal_closes_the_app_resources(tmp_path) -> None:
    from celery import signals

    import farm.celery_app  # noqa: F401 - connects the receiver

    class Controller:  # what Celery sends: its WorkController, which knows its app
        def __init__(self, app: Any) -> None:
            self.app = app

    res = _resources(tmp_path)
    responses = signals.worker_shutdown.send(sender=Controller(SimpleNamespace(farm_resources=res)))
    assert res.closed
    assert not [r for _, r in responses if isinstance(r, Exception)]
    responses = signals.worker_shutdown.send(sender=Controller(SimpleNamespace()))  # nothing to close
    assert not [r for _, r in responses if isinstance(r, Exception)]


@pytest.mark.slow
def test_sigterm_closes_a_real_workers_resources(farm_factory, tiny_models, tmp_path) -> None:
    """A worker process that rendered (a pinned model, a metrics server, heartbeat and reconciler
    threads) gets SIGTERM: a warm shutdown; it exits 0, says once what it released, and its row
    in the registry is ``stopped``."""
    from storage.models import Worker
    from storage.status import WorkerStatus

    farm = farm_factory()  # SQLite + local folder + filesystem broker
    port = free_port()
    worker = farm.start_worker(["farm.control", "farm.gpu.sd15"], name="closer", FARM_WORKER__METRICS_PORT=str(port))
    with farm.client() as client:
        job_id = client.submit(text_job(tiny_models["sd15"], prompts=["a red cube"], count=1))
        assert client.wait(job_id, timeout=180)["status"] == "succeeded"

    worker.proc.send_signal(signal.SIGTERM)
    try:
        code = worker.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"the worker did not stop on SIGTERM:\n{worker.log.read_text(errors='replace')[-4000:]}")
    log = worker.log.read_text(errors="replace")
    closed = [line for line in log.splitlines() if CLOSED in line]
    assert code == 0, log[-4000:]
    assert len(closed) == 1, log[-4000:]
    released = closed[0].split(f"{CLOSED}closer: ", 1)[1]
    assert released.split("; ") == [
        "heartbeat, reconciler and webhooks stopped",
        "metrics server stopped",
        "model cache: 1 pinned model dropped",
        "memory released (cpu)",
        "database engine disposed",
    ], closed[0]
    assert log.index("Warm shutdown") < log.index(CLOSED)  # after Celery let its task finish

    engine = make_engine(farm.settings().database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            row = session.execute(select(Worker.status, Worker.current_shard_id).where(Worker.name == "closer")).one()
    finally:
        engine.dispose()
    assert (row.status, row.current_shard_id) == (WorkerStatus.STOPPED, None)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _answers(port):
        time.sleep(0.1)
    assert not _answers(port)


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0
