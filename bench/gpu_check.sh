#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): CUDA tests, raw-limit sweep (bf16, channels_last), nvJPEG decode, a serving
# run, the OOM split; one JSON + markdown summary under bench/out/gpu_check/ (--out DIR to change).
#   bench/gpu_check.sh            on one CUDA GPU (under 8 minutes on an H100)
#   bench/gpu_check.sh --dry-run  on a CPU, tiny sizes: proves every step works
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT_S:-470}" "$PYTHON" -m bench.gpu_check "$@"
