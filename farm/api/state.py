"""What the API process holds for its lifetime: settings, the direct farm connection (database,
broker, store) and the request counters (the submission rate is counted in the database:
:func:`storage.audit.submit_wait`). Built by
:func:`farm.api.app.create_api`, reached by routes through ``request.app.state.farm_api``."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from farm.client import FarmClient
from farm.settings import FarmSettings


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
