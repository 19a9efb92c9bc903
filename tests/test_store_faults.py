"""The local store unwritable during a job, in a real worker process: its disk (a real tmpfs) is
first full (``ENOSPC``), then read-only (``EROFS``), for 15 s or more in all, then writable again.
Each failed write is an environment fault (``StorageUnavailable``, retryable) naming the store and
the key; the worker waits it out with backoff inside the shard's attempt, so no shard fails, the
job succeeds, the database and the store agree, and no temporary file is left on the disk.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Shard
from storage.status import ShardStatus
from tests.fixtures.consistency import check_job_outputs
from tests.fixtures.farm import text_job
from tests.fixtures.services import wait_for

SHARDS = 16
UNWRITABLE_S = 16.0  # at least this long in all, half full, half read-only
NOTICE = "the object store is unavailable"


def _count(factory, *where) -> int:
    with session_scope(factory) as session:
        return session.scalar(select(func.count()).select_from(Shard).where(*where))


@pytest.mark.integration
@pytest.mark.slow
def test_job_survives_a_full_then_read_only_local_store(
    farm_factory, tiny_models, pg_url, redis_url, small_disk, fault_table
) -> None:
    row = fault_table.row(
        "Resource faults",
        "local store unwritable during a job",
        f"the store's disk (a tmpfs) filled with a ballast file (ENOSPC), then remounted read-only (EROFS), "
        f"at least {UNWRITABLE_S:.0f} s in all, while a worker renders {SHARDS} one-image shards",
        "writes fail as retryable (store and key named); the worker waits with backoff; no shard fails; "
        "the job succeeds; rows and objects agree; no temporary file left",
    )
    disk = small_disk(size_mb=64)
    root = disk.path / "objects"
    farm = farm_factory(broker=redis_url, db_url=pg_url, FARM_STORAGE__LOCAL_ROOT=str(root))
    farm.start_worker(["farm.control"], name="control")
    worker = farm.start_worker(["farm.gpu.sd15"], name="gpu")
    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    try:
        with farm.client() as client:
            spec = text_job(tiny_models["sd15"], count=1, shard_size=1, prompts=[f"p{i}" for i in range(SHARDS)])
            job_id = client.submit(spec)
            started = time.monotonic()
            wait_for(
                lambda: _count(factory, Shard.job_id == job_id, Shard.status == ShardStatus.SUCCEEDED), 180, "a shard"
            )
            done_before = _count(factory, Shard.job_id == job_id, Shard.status == ShardStatus.SUCCEEDED)

            def said(code: str) -> int:  # backoff lines naming this errno
                text = worker.log.read_text(errors="replace")
                return sum(code in line for line in text.splitlines() if NOTICE in line)

            ballast = disk.fill()
            unwritable = time.monotonic()
            wait_for(lambda: said("(ENOSPC)"), 120, "the worker to run into the full disk")
            time.sleep(max(0.0, UNWRITABLE_S / 2 - (time.monotonic() - unwritable)))
            disk.free()
            disk.read_only()
            wait_for(lambda: said("(EROFS)"), 120, "the worker to run into the read-only disk")
            time.sleep(max(0.0, UNWRITABLE_S - (time.monotonic() - unwritable)))
            disk.writable()
            down = time.monotonic() - unwritable

            summary = client.wait(job_id, timeout=300)
            took = time.monotonic() - started
            counts = check_job_outputs(client, job_id)
        log = worker.log.read_text(errors="replace")
        notices = [line for line in log.splitlines() if NOTICE in line]
        assert summary["status"] == "succeeded", summary
        assert all(s["status"] == "succeeded" and s["attempts"] == 1 for s in summary["shards"]), summary["shards"]
        assert counts["artifacts"] == counts["succeeded_items"] == SHARDS, counts
        assert disk.leftovers() == [], "a failed write left its temporary file"
        named = [line for line in notices if f"LocalStore at {root}" in line and f"'tests/{job_id}/" in line]
        assert named, notices[:3]
        example = named[0].split("is unavailable (", 1)[-1].rsplit("); try", 1)[0]
        row.observed = (
            f"unwritable {down:.1f} s after {done_before}/{SHARDS} shards ({ballast >> 20} MiB ballast, then "
            f"read-only); the worker logged {len(notices)} backoffs ({said('(ENOSPC)')} ENOSPC, "
            f"{said('(EROFS)')} EROFS), e.g. '{example}'; job succeeded in {took:.0f} s, "
            f"{sum(s['attempts'] for s in summary['shards'])} attempts over {SHARDS} shards, "
            f"{counts['artifacts']} artifacts = {counts['objects']} objects, 0 temporary files left"
        )
    finally:
        engine.dispose()
