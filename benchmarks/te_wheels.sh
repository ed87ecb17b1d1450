#!/usr/bin/env bash
# Download, on a machine with PyPI access, what benchmarks/te_gpu.sh needs to install Transformer Engine 2.20.2 on a
# GPU machine without network (Python 3.12, CUDA 13, as on the lent H100/H200 machines; see docs/training.md):
#   .device_wheels/te/common/   the TE meta wheel, the transformer_engine_torch sdist (built there), pydantic and its
#                               three dependencies, megatron-fsdp and the config stack (benchmarks/gpu_wheels.sh)
#   .device_wheels/te/part-NN   the 276 MB transformer_engine_cu13 wheel cut into pieces that fit one device call
#                               (64 MiB carried per call, the repository included); its sha256 is in common/
# Then it prints the device calls to make, one piece each, back to back (the machine stays warm for 30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TE_VERSION=2.20.2
PART_MB="${PART_MB:-46}"
DEST=.device_wheels/te
mkdir -p "$DEST/common" "$DEST/download"
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST/common" \
    "transformer_engine==$TE_VERSION" pydantic pydantic_core annotated_types typing_inspection
# transformer_engine_torch is an sdist only; pip download would build its metadata, which needs CUDA: fetch the file.
"$PYTHON" - "$TE_VERSION" "$DEST/common" <<'PY'
import hashlib, json, sys, urllib.parse, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/transformer-engine-torch/json"
with urllib.request.urlopen(index) as response:
    sdist = next(u for u in json.load(response)["releases"][version] if u["packagetype"] == "sdist")
data = urllib.request.urlopen(urllib.parse.urljoin(index, sdist["url"])).read()  # mirrors give relative URLs
assert hashlib.sha256(data).hexdigest() == sdist["digests"]["sha256"], "sha256 mismatch"
open(f"{dest}/{sdist['filename']}", "wb").write(data)
print(sdist["filename"], len(data), "bytes")
PY
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST/download" \
    "transformer_engine_cu13==$TE_VERSION"
# pydantic_core must match pydantic's pin: download the exact version pydantic asks for.
core=$(unzip -p "$DEST"/common/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
if [ -n "$core" ]; then
    rm -f "$DEST"/common/pydantic_core-*.whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST/common" "pydantic_core==$core"
fi
bash benchmarks/gpu_wheels.sh >/dev/null && cp .device_wheels/*.whl "$DEST/common/"
wheel=$(ls "$DEST"/download/transformer_engine_cu13-*.whl)
(cd "$DEST/download" && sha256sum "$(basename "$wheel")") > "$DEST/common/transformer_engine_cu13.sha256"
rm -f "$DEST"/part-*
split -b "${PART_MB}M" -d -a 2 "$wheel" "$DEST/part-"
du -sh "$DEST/common" "$DEST"/part-*
echo
echo "Device calls, back to back (each 'run' with this carry; the last one has timeout_s 600):"
first=1
for part in "$DEST"/part-*; do
    if [ "$first" = 1 ]; then
        echo "  carry [$DEST/common, $part]  command: bash benchmarks/te_gpu.sh receive"
        first=0
    else
        echo "  carry [$part]  command: bash benchmarks/te_gpu.sh receive"
    fi
done
echo "  carry []  command: bash benchmarks/te_gpu.sh run   (writes \$OUT/te_acceptance.json, \$OUT/te_gpu.log)"
