#!/usr/bin/env bash
# The test command: make sure the local services are up, then run the whole pytest suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh || echo "services: some are down; their tests skip locally and fail in CI" >&2
exec .venv/bin/pytest "$@"
