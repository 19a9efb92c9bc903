"""One claimed shard being rendered: what a kind's runner gets, and how it records outputs.

:class:`ShardRun` carries the job spec, the shard's items, the keys already written by an
earlier attempt (so a retry skips them), the resident model and the lease keeper. A runner calls
:meth:`ShardRun.record` for every output: upload (waiting out a restarting object store,
``worker.service_wait_s``), then the artifact row is handed to the lease keeper, which writes it
with its next fenced lease write or with the shard's end, so a late write from an attempt that
lost its lease never lands. A crash between the upload and the row costs a render of that item
again on the next attempt (same key, same bytes), never a second row.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from farm.errors import FarmError
from farm.worker.job_patches import apply_job_patches
from farm.worker.lease_keeper import LeaseKeeper


class ShardHandBack(FarmError):
    """The shard stops between items and goes back, keeping the items done, no attempt counted.
    ``reason``: ``handed_back`` (before the broker's consumer_timeout: QUEUED and sent again at
    once), ``preempted`` (to make way for interactive work) or ``drained`` (the worker is stopping):
    PENDING again, the feeder sends it in its turn."""

    REASONS = ("handed_back", "preempted", "drained")

    def __init__(self, message: str, *, reason: str = "handed_back") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"reason: {reason!r} is not one of {', '.join(self.REASONS)}")
        super().__init__(message)
        self.reason = reason

    @property
    def to_feeder(self) -> bool:
        """PENDING again (the feeder sends it in its turn), not QUEUED and sent at once."""
        return self.reason != "handed_back"


@dataclass
class ShardRun:
    res: Any  # farm.worker.runtime.WorkerResources
    job_id: uuid.UUID
    shard_id: uuid.UUID
    shard_index: int
    spec: Any  # the job's JobSpec subclass
    items: list[dict[str, Any]]
    done_keys: set[str]
    keeper: LeaseKeeper
    loaded: Any  # farm.worker.model_cache.LoadedModel; None for a job that loads no model (JobKind.model_of)
    timings: dict[str, float]
    patches_fingerprint: str = ""
    items_done: int = 0
    memory: dict[str, Any] = field(default_factory=dict)  # limits after an out-of-memory (farm.worker.memory)
    deadline: float | None = None  # time.monotonic() by which this delivery must end (RabbitMQ consumer_timeout)
    _item_mark: float = field(default_factory=time.monotonic)
    _longest_item: float = 0.0

    @property
    def store(self) -> Any:
        return self.res.store

    @property
    def pipeline(self) -> Any:
        return self.loaded.pipeline

    def base_params(self) -> dict[str, Any]:
        """Parameters every output of this job records."""
        return {
            "model": self.spec.model,
            "model_hash": self.loaded.model_hash,
            "job_id": str(self.job_id),
            "patches": [p.model_dump(mode="json") for p in self.spec.patches],
            "patches_fingerprint": self.patches_fingerprint,
            **({"sag": sag.model_dump()} if (sag := getattr(self.spec, "sag", None)) is not None else {}),
            **({"loras": self.loaded.loras.recorded()} if getattr(self.spec, "loras", None) else {}),
            **({"memory": self.memory} if self.memory else {}),
        }

    def apply_patches(self, extra: list[Any]) -> None:
        """Apply the job's patches plus ``extra`` (for runners that build patches themselves)."""
        started = time.perf_counter()
        self.patches_fingerprint = apply_job_patches(self.loaded, self.spec, extra, res=self.res)
        self.add_time("patch_s", time.perf_counter() - started)

    def progress(self, fraction: float) -> None:
        """Report progress (0..1 of the shard) and stop here if the job was cancelled or the
        lease was lost."""
        self.keeper.report(self.items_done, min(1.0, max(0.0, fraction)))
        self.keeper.check()

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)

    def record(
        self,
        key: str,
        data: bytes,
        content_type: str,
        *,
        item: dict[str, Any],
        params: dict[str, Any],
        progress: float,
        item_finished: bool = False,
    ) -> None:
        """Upload one output; its artifact row goes in with the next lease write or the shard's
        end, fenced by the lease (:class:`~farm.worker.lease_keeper.LeaseKeeper`). An output an
        earlier attempt already recorded is left as it is."""
        self.keeper.check()
        if key in self.done_keys:
            self.items_done += 1 if item_finished else 0
            self.keeper.report(self.items_done, progress)
            return
        started = time.perf_counter()
        where = f"shard {self.shard_id}: writing {key}"
        info = self.res.outlast(
            lambda: self.store.put_bytes(key, data, content_type=content_type), where, self.keeper.check
        )
        items_done = self.items_done + (1 if item_finished else 0)
        self.keeper.add_artifact(  # written with the next lease write, or with the shard's end
            {
                "job_id": self.job_id,
                "shard_id": self.shard_id,
                "key": key,
                "item_index": int(item["index"]),
                "seed": int(item["seed"]),
                "sha256": info.sha256,
                "size_bytes": info.size,
                "content_type": content_type,
                "params": params,
                "model_hash": self.loaded.model_hash if self.loaded is not None else None,
            }
        )
        self.done_keys.add(key)
        self.items_done = items_done
        self.keeper.report(items_done, progress)
        self.add_time("upload_s", time.perf_counter() - started)
        if item_finished:
            self._before_next_item()

    def hand_back_if_draining(self) -> None:
        """Hand the shard back when the worker is stopping (``res.draining``, set by SIGTERM:
        :mod:`farm.worker.drain`) and items are left; a shard on its last item finishes."""
        if self.res.draining.is_set() and self.items_done < len(self.items):
            raise ShardHandBack(
                f"shard {self.shard_id}: handed back after {self.items_done} of {len(self.items)} items: worker "
                f"{self.res.name} is stopping (drained); it is fed again in its turn",
                reason="drained",
            )

    def _before_next_item(self) -> None:
        """Hand the shard back when the worker is stopping, when interactive work waits for this
        worker (the feeder asked: :mod:`farm.feeder`), or when the next item would likely end
        after :attr:`deadline`."""
        now = time.monotonic()
        self._longest_item = max(self._longest_item, now - self._item_mark)
        self._item_mark = now
        self.hand_back_if_draining()
        if self.keeper.preempted.is_set() and self.items_done < len(self.items):
            raise ShardHandBack(
                f"shard {self.shard_id}: handed back after {self.items_done} of {len(self.items)} items: interactive "
                "work waits for its queue (preempted); it is fed again in its turn",
                reason="preempted",
            )
        if self.deadline is not None and self.items_done < len(self.items) and now + self._longest_item > self.deadline:
            raise ShardHandBack(
                f"shard {self.shard_id}: handed back after {self.items_done} of {len(self.items)} items, before the "
                "broker's consumer_timeout (broker.consumer_timeout_s); a new delivery renders the rest"
            )
