"""What the API process holds for its lifetime: settings, the direct farm connection (database,
broker, store), the submission limiter and the request counters. Built by
:func:`farm.api.app.create_api`, reached by routes through ``request.app.state.farm_api``."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from farm.client import FarmClient
from farm.settings import FarmSettings


class SubmitLimiter:
    """At most ``per_minute`` submissions per token in any minute (a sliding window kept in this
    process: each API process counts its own). ``retry_after`` says how long to wait."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._times: dict[Any, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    def retry_after(self, who: Any, now: float | None = None) -> float | None:
        """``None`` (and the submission counted) when ``who`` may submit now, else seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [t for t in self._times[who] if t > now - 60.0]
            if len(recent) >= self.per_minute:
                self._times[who] = recent
                return max(0.1, recent[0] + 60.0 - now)
            recent.append(now)
            self._times[who] = recent
            return None


@dataclass
class RequestCounters:
    """Requests by route and status, and their total time, for ``/metrics``."""

    counts: dict[tuple[str, str, int], int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.counts[(method, route, status)] += 1
            self.seconds[(method, route)] += seconds


@dataclass
class ApiState:
    settings: FarmSettings
    farm: FarmClient
    limiter: SubmitLimiter
    counters: RequestCounters = field(default_factory=RequestCounters)

    @property
    def sessions(self) -> Any:
        return self.farm.sessions

    @property
    def store(self) -> Any:
        return self.farm.store

    def public_url(self, request: Request) -> str:
        """The URL people reach the API at (``api.public_url``), else the one this request used."""
        configured = self.settings.api.public_url
        return (configured or str(request.base_url)).rstrip("/")


def api_state(request: Request) -> ApiState:
    return request.app.state.farm_api
