"""``farm worker`` (a render worker process) and ``farm demo`` (the embedded farm end to end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import typer

from farm.celery_app import CONTROL_QUEUE, create_app, worker_argv
from farm.cli.common import console, err_console, settings
from farm.cli.jobs_cmd import print_job, wait_with_progress
from farm.client import FarmClient
from farm.errors import UserError
from farm.model_refs import is_registry_ref
from farm.model_registry import resolve_model_ref
from farm.reconciler import Reconciler, ReconcilerLoop
from farm.sharding import WORK_QUEUES
from farm.tiny_models import build_tiny_model
from farm.webhook_delivery import WebhookDeliverer, WebhookLoop
from farm.worker.drain import WorkerDrain
from farm.worker.heartbeat import WorkerHeartbeat
from farm.worker.metrics import WorkerMetrics
from farm.worker.resources import WorkerResources
from storage import migrate
from storage.db import session_scope
from storage.registry import live_workers


def worker(
    queues: str | None = typer.Option(
        None, help="Comma-separated queues. Default: the configured worker queues plus farm.control."
    ),
    preload: list[str] = typer.Option(
        [], help="FAMILY:MODEL to load before taking work (repeatable; MODEL may be registry:NAME[@VERSION])."
    ),
    name: str | None = typer.Option(None, help="Worker name (default: host-pid)."),
    loglevel: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Run a worker: one process, one device, models pinned in memory (--queues farm.cpu: the
    post-steps, no model). SIGTERM drains it: no new shard, the current one handed back after its
    item, exit 0 within worker.drain_timeout_s; a second SIGTERM stops it at once."""

    cfg = settings()
    selected = known_queues([q.strip() for q in (queues.split(",") if queues else [*cfg.worker.queues, CONTROL_QUEUE])])
    app = create_app(cfg)
    # Closed at Celery's worker_shutdown (a warm shutdown: SIGTERM, Ctrl+C), else when this block
    # ends (a cold shutdown, a failed start): threads stopped, models freed, connections closed.
    with WorkerResources.create(cfg, name) as resources:
        app.farm_resources = resources
        app.farm_drain = WorkerDrain(resources, cfg.worker.drain_timeout_s)  # installed at worker_ready
        if CONTROL_QUEUE not in selected:
            _warn_without_control(resources)
        for ref in preload:
            family, _, model = ref.partition(":")
            if is_registry_ref(model):  # the version a job naming it now would be pinned to
                model = resolve_model_ref(resources.store, model).pinned
            loaded = resources.model_cache().get(model, family)
            console.print(f"pinned {family} model {model} ({loaded.load_seconds:.2f}s)")
        if cfg.worker.metrics_port is not None:
            resources.metrics = WorkerMetrics()
            resources.metrics.serve(cfg.worker.metrics_port, cfg.worker.metrics_address)
            console.print(f"metrics on http://{cfg.worker.metrics_address}:{cfg.worker.metrics_port}/metrics")
        resources.hold(WorkerHeartbeat(resources, selected), "heartbeat")
        if CONTROL_QUEUE in selected and cfg.reconcile.enabled:
            reconciler = Reconciler(cfg, resources.session_factory, app, resources.store, resources.metrics)
            resources.hold(ReconcilerLoop(reconciler), "reconciler")
        if CONTROL_QUEUE in selected and cfg.webhooks.enabled:
            resources.hold(WebhookLoop(WebhookDeliverer(cfg.webhooks, resources.session_factory)), "webhooks")
        # Tasks run one at a time on a pool thread; this thread runs the consumer loop.
        app.worker_main(worker_argv(selected, f"{resources.name}@%h", loglevel))


def known_queues(names: list[str]) -> list[str]:
    """The queues named, refused (listing the known ones) when one is not a farm queue: a typo
    would leave a worker waiting on a queue nobody sends to."""

    names = [name for name in names if name]
    known = (CONTROL_QUEUE, *WORK_QUEUES)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UserError(
            f"--queues: unknown queue(s) {', '.join(repr(n) for n in unknown) or '(none given)'}; "
            f"known: {', '.join(known)}"
        )
    return names


def _warn_without_control(resources) -> None:
    """Say so when nothing would schedule or finalize jobs: no live worker consumes farm.control."""

    with session_scope(resources.session_factory) as session:
        control = live_workers(session, CONTROL_QUEUE, resources.settings.worker.lost_after_s)
    if not control:
        err_console.print(
            f"warning: no live worker consumes {CONTROL_QUEUE}: jobs are not scheduled or finalized until one "
            f"runs (farm worker --queues {CONTROL_QUEUE})",
            highlight=False,
        )


def demo(
    prompts: int = typer.Option(3, min=1, max=20, help="How many prompts."),
    seeds: int = typer.Option(2, min=1, max=20, help="Seeds per prompt."),
) -> None:
    """Run the embedded farm end to end: tiny model, a worker process, a multi-shard job."""

    cfg = settings()
    migrate.upgrade(cfg.database_url)
    model = (cfg.data_dir / "models" / "tiny-sd15").resolve()
    if not (model / "model_index.json").is_file():
        console.print(f"building a tiny random-weight SD1.5 model in {model} ...")
        build_tiny_model("sd15", model)
    log_path = cfg.data_dir / "demo-worker.log"
    console.print(f"starting a worker process (log: {log_path})")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm", "worker", "--queues", "farm.control,farm.gpu.sd15", "--loglevel", "WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    try:
        with FarmClient(cfg, direct=True) as client:  # the embedded farm of this machine
            spec = {
                "model": str(model),
                "family": "sd15",
                "prompts": [f"a tiny test render number {i}" for i in range(prompts)],
                "base_seed": 1000,
                "count": seeds,
                "steps": 4,
                "width": 64,
                "height": 64,
                "guidance": 5.0,
                "shard_size": 2,
                "output_prefix": "demo",
            }
            started = time.perf_counter()
            job_id = client.submit(spec)
            console.print(f"submitted job {job_id}: {prompts} prompts x {seeds} seeds")
            summary = wait_with_progress(client, job_id, timeout=600)
            print_job(summary)
            outputs = cfg.local_store_root.resolve() / "demo" / str(job_id)
            console.print(f"finished in {time.perf_counter() - started:.1f}s")
            console.print(f"outputs:       {outputs}")
            console.print(f"contact sheet: {outputs / 'contact_sheet.png'}")
            console.print(f"manifest:      {outputs / 'manifest.json'}")
            if summary["status"] != "succeeded":
                raise typer.Exit(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        console.print("worker stopped")


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(demo)
