#!/usr/bin/env bash
# Download, on a machine with PyPI access, the pure-Python wheels that benchmarks/gpu_check.py needs on a GPU machine
# without network (torch, numpy, pyarrow, pandas, transformers and pytest are already there):
# megatron-fsdp (pinned as in pyproject's gpu extra) and the training config stack (hydra-core, omegaconf, antlr4).
# They land in .device_wheels/ (git-ignored); carry that folder, and benchmarks/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DEST=.device_wheels
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
    megatron-fsdp==0.6.1 hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as an sdist only: build its pure-Python wheel here.
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
ls -l "$DEST"
