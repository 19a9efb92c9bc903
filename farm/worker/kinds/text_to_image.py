"""Running ``text_to_image`` shards: every item is one :class:`~farm.worker.images.ImageRequest`."""

from __future__ import annotations

from farm.worker.images import item_requests, render_image_items
from farm.worker.shard_run import ShardRun


def run_text_to_image_shard(run: ShardRun) -> int:
    """Render every item of a ``text_to_image`` shard not already written; returns items done."""
    render_image_items(run, item_requests(run, enumerate(run.items)))
    return run.items_done
