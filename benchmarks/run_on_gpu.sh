#!/usr/bin/env bash
# One device call: environment facts, GPU tests, then the benchmark. Logs and JSON go to $OUT
# (the device tool brings back what is there); the benchmark's table is printed last.
#   bash benchmarks/run_on_gpu.sh [pytest args...]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/dmattn_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"
python3 -m pytest -q -m gpu -p no:cacheprovider "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 40
