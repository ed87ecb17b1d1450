#!/usr/bin/env bash
# Install Transformer Engine 2.20.2 offline on a lent GPU machine and run its acceptance (issue 14):
#   bash benchmarks/te_gpu.sh receive   stage the pieces carried in this call (.device_wheels/te, made here by
#                                       benchmarks/te_wheels.sh) in /tmp/te_stage; once the sdist is there, start
#                                       building transformer_engine_torch in the background (minutes)
#   bash benchmarks/te_gpu.sh run       join the cu13 wheel, check its sha256, wait for the build, install the TE
#                                       wheels in one pip call, then benchmarks/te_acceptance.py -> $OUT
# The facts behind each step (env variables, headers, one pip call) are in docs/training.md, "Transformer Engine on
# a GPU machine without network".
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/te_stage
BUILT=/tmp/te_built
SITE=/tmp/gfw_site
OUT_DIR="${OUT:-te_gpu_out}"
mkdir -p "$STAGE" "$BUILT" "$OUT_DIR"

nvidia_includes() {
    # CUDA runtime, cuDNN and NCCL headers of the pip nvidia-* packages that torch depends on.
    python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "include"))})))
PY
}

build() {
    export NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_NO_LOCAL_VERSION=1 NVTE_BUILD_USE_NVIDIA_WHEELS=1
    export MAX_JOBS="${MAX_JOBS:-16}"
    CPATH="$(nvidia_includes)${CPATH:+:$CPATH}"
    export CPATH
    if python3 -m pip wheel -v --no-deps --no-build-isolation --no-index -w "$BUILT" "$STAGE"/transformer_engine_torch-*.tar.gz; then
        touch "$BUILT/.done"
    else
        touch "$BUILT/.failed"
    fi
}

receive() {
    if [ -d .device_wheels/te/common ]; then cp -n .device_wheels/te/common/* "$STAGE"/; fi
    for part in .device_wheels/te/part-*; do [ -f "$part" ] && cp "$part" "$STAGE"/; done
    ls -l "$STAGE"
    if compgen -G "$STAGE/transformer_engine_torch-*.tar.gz" >/dev/null && [ ! -e "$BUILT/.started" ]; then
        touch "$BUILT/.started"
        setsid nohup bash "$0" build >/tmp/te_build.log 2>&1 </dev/null &
        echo "building transformer_engine_torch in the background (log: /tmp/te_build.log)"
    fi
}

run() {
    local wheel
    wheel=$(awk '{print $2}' "$STAGE/transformer_engine_cu13.sha256")
    cat "$STAGE"/part-* >"$STAGE/$wheel"
    (cd "$STAGE" && sha256sum -c transformer_engine_cu13.sha256) || { echo "the cu13 wheel is incomplete: carry every part-NN"; exit 1; }
    for _ in $(seq 1 60); do
        [ -e "$BUILT/.done" ] || [ -e "$BUILT/.failed" ] && break
        sleep 5
    done
    tail -n 30 /tmp/te_build.log >"$OUT_DIR/te_build_tail.log" 2>/dev/null
    if [ ! -e "$BUILT/.done" ]; then echo "transformer_engine_torch did not build:"; cat "$OUT_DIR/te_build_tail.log"; exit 1; fi
    # One pip call for every TE wheel: separate --target installs overwrite the shared transformer_engine/ package.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STAGE/$wheel" "$STAGE"/transformer_engine-*.whl "$BUILT"/transformer_engine_torch-*.whl \
        "$STAGE"/pydantic*.whl "$STAGE"/annotated_types-*.whl "$STAGE"/typing_inspection-*.whl \
        "$STAGE"/megatron_fsdp-*.whl "$STAGE"/hydra_core-*.whl "$STAGE"/omegaconf-*.whl "$STAGE"/antlr4*.whl || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
    python3 -c "import torch, transformer_engine.pytorch as te, transformer_engine; print('TE', transformer_engine.__version__)" || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 benchmarks/te_acceptance.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/te_gpu.log"
}

case "${1:-}" in
    receive) receive ;;
    build) build ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash benchmarks/te_gpu.sh receive|run [te_acceptance.py options]" >&2; exit 2 ;;
esac
