"""Prometheus metrics of one worker process, served on ``worker.metrics_port``.

:class:`WorkerMetrics` owns its own registry (nothing global, nothing at import time); the runtime
calls :meth:`WorkerMetrics.observe_shard` once per delivery it handles. GPU memory is read at
scrape time, and only when this process has torch loaded and a CUDA device.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STAGES = ("queue_wait", "load", "patch", "denoise", "upload")


class _GpuMemory:
    """``farm_gpu_memory_bytes{device, kind}``: allocated and reserved by this process."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")  # never import torch for a scrape
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        family = GaugeMetricFamily(
            "farm_gpu_memory_bytes", "GPU memory held by this worker's tensors", labels=["device", "kind"]
        )
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            family.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
            family.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
        yield family


class WorkerMetrics:
    """The counters and histograms of one worker process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.shards = Counter("farm_shards", "Shard deliveries handled, by outcome", ["queue", "outcome"], registry=r)
        self.items = Counter("farm_items", "Render items finished", ["queue"], registry=r)
        self.model_loads = Counter("farm_model_loads", "Pipelines loaded from disk", ["family"], registry=r)
        self.model_hits = Counter("farm_model_cache_hits", "Pipelines found pinned in memory", ["family"], registry=r)
        self.patch_seconds = Histogram(
            "farm_patch_apply_seconds", "Time to make a job's patch set the applied one", ["queue"],
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "farm_shard_stage_seconds", "Seconds per shard in each stage", ["queue", "stage"],
            buckets=SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.items_per_second = Gauge(
            "farm_items_per_second", "Items per second of the last shard rendered", ["queue"], registry=r
        )
        self.reconcile_actions = Counter(
            "farm_reconciler_actions", "What reconciler passes did, by action", ["action"], registry=r
        )
        self.reconcile_seconds = Histogram(
            "farm_reconciler_pass_seconds", "Seconds per reconciler pass", buckets=SECONDS_BUCKETS, registry=r
        )
        r.register(_GpuMemory())
        self.server: Any = None

    def observe_model(self, family: str, *, loaded: bool) -> None:
        (self.model_loads if loaded else self.model_hits).labels(family).inc()

    def observe_shard(
        self, queue: str, outcome: str, timings: dict[str, float] | None = None, items: int = 0, seconds: float = 0.0
    ) -> None:
        """One delivery: its outcome; for a rendered shard also its stage times and throughput."""
        self.shards.labels(queue, outcome).inc()
        if not timings or outcome not in ("succeeded", "failed", "retry"):
            return
        for stage in STAGES:
            value = timings.get(f"{stage}_s")
            if value is not None:
                self.stage_seconds.labels(queue, stage).observe(value)
        if "patch_s" in timings:
            self.patch_seconds.labels(queue).observe(timings["patch_s"])
        if items:
            self.items.labels(queue).inc(items)
            if seconds > 0:
                self.items_per_second.labels(queue).set(items / seconds)

    def observe_reconcile(self, report: Any) -> None:
        """One reconciler pass (a :class:`farm.reconciler.ReconcileReport`)."""
        for action in report.ACTIONS:
            count = getattr(report, action)
            if count:
                self.reconcile_actions.labels(action).inc(count)
        self.reconcile_seconds.observe(report.seconds)

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``address:port`` from a daemon thread."""
        self.server, _ = start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
