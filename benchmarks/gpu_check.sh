#!/usr/bin/env bash
# Entry point on a lent GPU machine: install the carried wheels (benchmarks/gpu_wheels.sh) into /tmp, then run
# benchmarks/gpu_check.py (the sections of benchmarks/gpu_*.py), which writes gpu_check.json/.md/.log to $OUT (or
# the first argument).
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
shift || true
if compgen -G ".device_wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gfw_site \
        .device_wheels/*.whl || echo "warning: installing .device_wheels failed; sections that need them will fail"
    export PYTHONPATH="/tmp/gfw_site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "warning: no .device_wheels/*.whl (run benchmarks/gpu_wheels.sh here and carry .device_wheels)"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python3 benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
