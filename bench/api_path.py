"""The farm API's path vs the direct path, in one run on one scratch farm (Postgres, Redis).

- **submit latency**: the same small text-to-image spec submitted ``--jobs`` times by the direct
  client (database + broker, what the control host does) and by the API client (``farm api`` on a
  loopback port: a spec check, then the submit, each an HTTP request with a token checked against
  the database), alternating; medians and their ratio. Also the bare ``POST /v1/jobs`` alone.
- **status reads**: ``get(job)`` per second, direct vs through the API.
- **events delivered per second**: one client follows a job's ``/v1/jobs/{id}/events`` stream
  while this process changes the job ``--events`` times (its priority, direct), each change
  waited for on the stream: changes per second pushed to the watcher and the delay of each
  (bounded below by ``api.events_poll_s``, set with ``--poll``).

No worker runs: jobs stay pending, which is all the front door's own cost needs.

    python -m bench api_path [--jobs 100] [--events 50] [--poll 0.05] [--redis-url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.cli import write_json
from bench.services import PG_ADMIN, REDIS_URL, scratch_postgres, scratch_redis


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spec(model: Path, i: int) -> dict[str, Any]:
    return {
        "model": str(model),
        "family": "sd15",
        "prompts": ["a lighthouse"],
        "base_seed": i,
        "count": 4,
        "steps": 2,
        "width": 64,
        "height": 64,
        "shard_size": 1,
        "output_prefix": "bench-api",
    }


def _median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def _timed(fn: Any, arg: Any) -> float:
    started = time.perf_counter()
    fn(arg)
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from farm.client import FarmClient
    from farm.settings import FarmSettings
    from farm.tiny_models import build_tiny_model
    from storage.db import make_engine, make_session_factory, session_scope
    from storage.identity import create_token, create_user

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_s, scratch_postgres(args.pg_admin) as db_url:
        tmp = Path(tmp_s)
        model = build_tiny_model("sd15", tmp / "tiny-sd15")
        with scratch_redis(args.redis_url) as redis_url:
            settings = FarmSettings(
                _env_file=None, data_dir=tmp / "data", db={"url": db_url}, broker={"url": redis_url}
            )
            engine = make_engine(db_url)
            with session_scope(make_session_factory(engine)) as session:
                create_user(session, "bench", "admin", project="bench")
                _, token = create_token(session, "bench", name="bench")
            engine.dispose()
            port = _free_port()
            env = {
                "FARM_DB__URL": db_url,
                "FARM_BROKER__URL": redis_url,
                "FARM_DATA_DIR": str(tmp / "data"),
                "FARM_API__EVENTS_POLL_S": str(args.poll),
                "FARM_API__SUBMIT_PER_MINUTE": "100000",
            }
            server = subprocess.Popen(
                [sys.executable, "-m", "farm", "api", "--port", str(port), "--loglevel", "warning"],
                env={**{k: v for k, v in os.environ.items() if not k.startswith("FARM_")}, **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("farm api did not start")
                    time.sleep(0.2)
                return _measure(args, settings, url, token, model, FarmClient)
            finally:
                server.terminate()
                server.wait(timeout=15)


def _measure(args: argparse.Namespace, settings: Any, url: str, token: str, model: Path, FarmClient: Any) -> dict:
    import httpx

    api_settings = type(settings)(_env_file=None, api={"url": url, "token": token})  # only what a person holds
    direct, api = FarmClient(settings, direct=True), FarmClient(api_settings)
    raw = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    try:
        for i in range(5):  # warm-up: connections, statement caches
            direct.submit(_spec(model, 10_000 + i))
            api.submit(_spec(model, 20_000 + i))
        d_times, a_times, r_times = [], [], []
        for i in range(args.jobs):  # alternating, so drift hits both alike
            d_times.append(_timed(direct.submit, _spec(model, 30_000 + i)))
            a_times.append(_timed(api.submit, _spec(model, 40_000 + i)))
            r_times.append(
                _timed(
                    lambda spec: raw.post("/v1/jobs", json={"spec": spec}).raise_for_status(), _spec(model, 50_000 + i)
                )
            )
        job = direct.submit(_spec(model, 1))
        reads = {}
        for name, client in (("direct", direct), ("api", api)):
            started = time.perf_counter()
            for _ in range(args.reads):
                client.get(job)
            reads[name] = args.reads / (time.perf_counter() - started)
        events = _events(args, direct, raw, job)
    finally:
        direct.close()
        api.close()
        raw.close()
    return {
        "jobs": args.jobs,
        "submit_ms": {
            "direct": _median_ms(d_times),
            "api_client": _median_ms(a_times),
            "api_post_only": _median_ms(r_times),
            "ratio_api_client": statistics.median(a_times) / statistics.median(d_times),
        },
        "status_reads_per_s": {**reads, "ratio": reads["api"] / reads["direct"]},
        "events": events,
    }


def _events(args: argparse.Namespace, direct: Any, raw: Any, job: Any) -> dict[str, float]:
    """Changes pushed through a job's event stream: per second, and each one's delay."""
    import httpx

    seen: list[tuple[float, int]] = []
    ready, stop = threading.Event(), threading.Event()

    def follow() -> None:
        try:
            with raw.stream("GET", f"/v1/jobs/{job}/events", timeout=None) as response:
                ready.set()
                for line in response.iter_lines():
                    if stop.is_set():
                        return
                    if line.startswith("data: "):
                        seen.append((time.perf_counter(), json.loads(line[6:])["priority"]))
        except httpx.HTTPError:  # the stream is closed under it at the end
            return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    ready.wait(30)
    while not seen:
        time.sleep(0.01)
    delays = []
    started = time.perf_counter()
    for i in range(args.events):
        priority = 1 + i % 2
        changed = time.perf_counter()
        direct.set_priority(job, priority)
        while not (seen and seen[-1][1] == priority and seen[-1][0] >= changed):
            time.sleep(0.001)
        delays.append(seen[-1][0] - changed)
    total = time.perf_counter() - started
    stop.set()
    raw.close()  # ends the stream the follower holds
    return {
        "changes": args.events,
        "per_s": args.events / total,
        "delay_ms_median": _median_ms(delays),
        "delay_ms_max": 1000 * max(delays),
        "poll_s": args.poll,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench api_path", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="submissions per path")
    parser.add_argument("--reads", type=int, default=200, help="status reads per path")
    parser.add_argument("--events", type=int, default=50, help="job changes pushed through the event stream")
    parser.add_argument("--poll", type=float, default=0.05, help="api.events_poll_s of the server")
    parser.add_argument("--pg-admin", default=PG_ADMIN)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    result = run(args)
    s, r, e = result["submit_ms"], result["status_reads_per_s"], result["events"]
    print(
        f"submit, median of {args.jobs}: direct {s['direct']:.2f} ms, API client {s['api_client']:.2f} ms "
        f"(x{s['ratio_api_client']:.2f}; check + submit), POST /v1/jobs alone {s['api_post_only']:.2f} ms"
    )
    print(f"status reads: direct {r['direct']:.0f}/s, API {r['api']:.0f}/s (x{r['ratio']:.2f})")
    print(
        f"event stream: {e['per_s']:.1f} changes/s delivered, delay median {e['delay_ms_median']:.0f} ms, "
        f"max {e['delay_ms_max']:.0f} ms (api.events_poll_s {e['poll_s']})"
    )
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
