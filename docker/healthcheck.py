#!/opt/farm/bin/python
"""Container health checks for the farm's images (installed as ``farm-healthcheck``).

    farm-healthcheck worker     this container's `farm worker` is registered and online in the
                                worker registry (the table `farm workers` shows), and its metrics
                                endpoint answers when FARM_WORKER__METRICS_PORT is set; a worker
                                draining (told to stop, SIGTERM) is not ready
    farm-healthcheck http URL   URL answers 200 (Flower's /healthcheck)
    farm-healthcheck broker     the configured broker (FARM_BROKER__URL) accepts a connection

Settings come from the same FARM_* variables as the farm itself. Exit status 0 = healthy, 1 =
not; one line says why. Secrets are never printed.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from typing import Any

TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"


def pick_worker(rows: list[dict[str, Any]], hostname: str) -> dict[str, Any] | None:
    """The online registry row of a worker on ``hostname`` (a container's hostname is its id, so
    every replica has its own), the most recently heard from first."""
    online = [w for w in rows if w.get("hostname") == hostname and w.get("status") == "online"]
    return min(online, key=lambda w: w.get("silent_s", 0.0), default=None)


def local_address(address: str) -> str:
    """Where to reach, from inside the container, a port bound to ``address``."""
    return LOOPBACK if address in ("", "0.0.0.0", "::", "localhost") else address  # noqa: S104


def http_ok(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (scheme checked above)
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return f"{url} answered 200"


def check_worker() -> str:
    from farm.client import FarmClient
    from farm.settings import load_settings

    cfg = load_settings()
    hostname = socket.gethostname()
    with FarmClient(cfg, direct=True) as client:  # a worker is a trusted service: never through the API
        rows = client.workers()
    mine = pick_worker(rows, hostname)
    if mine is None:
        draining = [w["name"] for w in rows if w.get("hostname") == hostname and w.get("status") == "draining"]
        if draining:
            raise RuntimeError(f"worker {', '.join(draining)} on {hostname} is draining (stopping): not ready")
        seen = sorted({w["status"] for w in rows if w.get("hostname") == hostname})
        raise RuntimeError(
            f"no online farm worker registered from {hostname} (rows from this host: {', '.join(seen) or 'none'})"
        )
    message = f"worker {mine['name']} online on {', '.join(mine['queues'])}, last heartbeat {mine['silent_s']}s ago"
    if cfg.worker.metrics_port is not None:
        url = f"http://{local_address(cfg.worker.metrics_address)}:{cfg.worker.metrics_port}/metrics"
        message += f"; {http_ok(url)}"
    return message


def check_broker() -> str:
    from kombu import Connection

    from farm.celery_app import broker_options
    from farm.settings import load_settings, redact_url

    cfg = load_settings()
    with Connection(cfg.broker.url, transport_options=broker_options(cfg), connect_timeout=TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
    return f"broker {redact_url(cfg.broker.url)} reachable"


def main(argv: list[str]) -> int:
    checks = {"worker": check_worker, "broker": check_broker}
    try:
        if len(argv) == 2 and argv[0] == "http":
            message = http_ok(argv[1])
        elif len(argv) == 1 and argv[0] in checks:
            message = checks[argv[0]]()
        else:
            print("usage: farm-healthcheck worker | broker | http URL", file=sys.stderr)
            return 2
    except Exception as exc:  # any failure is "unhealthy", reported in one line
        print(f"unhealthy: {type(exc).__name__}: {exc}")
        return 1
    print(f"healthy: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
