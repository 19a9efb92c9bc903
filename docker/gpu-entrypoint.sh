#!/bin/sh
# Entry point of the GPU worker image: give this container a GPU of its own, then run the command.
#
# Docker cannot hand the replicas of one service different GPUs: a `count: 1` reservation is the
# host's first GPU for every replica. So the worker services in docker/compose.yaml reserve the
# host's GPUs and each worker container takes one of them: the first whose lock file in
# $GPU_LOCK_DIR (a volume shared by the worker containers of one host) it can hold. The lock is
# an open file descriptor kept across `exec`, so it lasts exactly as long as the worker process,
# and the kernel releases it however that process ends (crash, OOM kill, SIGKILL). GPUs are
# named by UUID, so containers that see different subsets of the host's GPUs agree on them.
#
# CUDA_VISIBLE_DEVICES set by you pins the worker to that GPU and skips the locks; so does an
# empty GPU_LOCK_DIR.
set -eu

say() { echo "gpu-entrypoint: $*" >&2; }

lock_dir="${GPU_LOCK_DIR:-}"
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    say "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} (set by you)"
    exec "$@"
fi
if [ -z "$lock_dir" ]; then
    exec "$@"
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "nvidia-smi not found (no GPU reserved for this container?); starting without choosing a GPU"
    exec "$@"
fi
gpus=$(nvidia-smi --query-gpu=uuid --format=csv,noheader) || {
    say "nvidia-smi could not list the GPUs"
    exit 1
}
mkdir -p "$lock_dir"
count=0
for uuid in $gpus; do
    count=$((count + 1))
    exec 9>>"$lock_dir/$uuid.lock"
    if flock -n 9; then
        CUDA_VISIBLE_DEVICES="$uuid"
        export CUDA_VISIBLE_DEVICES
        say "using GPU $uuid ($count of $(echo "$gpus" | wc -w))"
        exec "$@"
    fi
    exec 9>&-
done
say "all $count GPU(s) visible here already run a farm worker of this host; run at most one worker per GPU"
exit 1
