#!/usr/bin/env bash
# The test command: make sure the local services are up, then run the whole pytest suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh || echo "services: some are down; their tests skip locally and fail in CI" >&2
# The dashboard's browser tests drive Debian's chromium through Playwright. A fresh machine gets it
# here when we may install packages; if that fails the run goes on and those tests say why.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the dashboard's browser tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "chromium: install failed; the browser tests fail in CI and skip locally" >&2
fi
# Two test processes (pytest-xdist, a file at a time each): most tests wait on worker processes
# and services, so two keep both cores of a CI machine busy. Every process has its own Postgres
# databases, Redis database, RabbitMQ vhost and SeaweedFS. TEST_PROCESSES=0 runs in one process
# (for -s or a debugger); later arguments win, so `-n 0` works too.
exec .venv/bin/pytest -n "${TEST_PROCESSES:-2}" --dist loadfile "$@"
