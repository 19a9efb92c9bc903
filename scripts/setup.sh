#!/usr/bin/env bash
# Set up a development/worker environment in ./.venv on a fresh machine.
# torch==2.13.0 goes in FIRST: that is the CPU build, and once it is present the `worker`
# extra's `torch>=2.4` installs nothing more (a loose requirement alone pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
echo "setup done: $(.venv/bin/farm --version 2>/dev/null || echo farm) in .venv"
