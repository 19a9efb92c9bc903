"""A daemon thread that does one thing every ``interval`` seconds until stopped (the worker's
heartbeat, the reconciler loop). A failed tick is logged and the next one runs on time: a
restarting database must not end the loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeriodicThread:
    """Calls ``tick()`` every ``interval`` seconds on a daemon thread named ``name``."""

    def __init__(self, name: str, interval: float, tick: Callable[[], object], what: str) -> None:
        self.name, self.interval, self.tick, self.what = name, interval, tick, what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as exc:  # never let the loop die
                log.warning("%s failed: %s", self.what, exc)

    def start(self) -> PeriodicThread:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
