"""``farm worker`` with the bench's job kinds registered: ``python -m bench.farm_worker [options]``.

Takes exactly the options of ``farm worker`` and runs the same command (same app, resources,
heartbeat, pool); the only difference is that :mod:`bench.noop_kind` is imported first, so
this worker also runs ``bench_noop`` shards. Used by ``bench.celery_overhead``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import bench.noop_kind  # noqa: F401  (registers the bench_noop job kind)
    from farm.cli import app
    from farm.cli.common import run_app

    sys.argv = ["farm", "worker", *(sys.argv[1:] if argv is None else argv)]
    run_app(app)


if __name__ == "__main__":
    main()
