"""One prepared check for a lent GPU machine: GPU tests, backends, bf16 throughput and MFU, packing, 4b memory.

Runs the sections of the ``benchmarks/gpu_*.py`` scripts, one measured question each (see each script's docstring):

===============  ======================  =========================================================================
section          script                  question
===============  ======================  =========================================================================
``environment``  ``gpu_environment.py``  torch / CUDA / device, the peak bf16 FLOP/s used for MFU, optional packages
``tests``        ``gpu_environment.py``  do the GPU tests pass? (``pytest -m gpu tests/train tests/model``)
``backends``     ``gpu_backends.py``     do backends none, fsdp2 and mfsdp train, checkpoint and resume alike?
``throughput``   ``gpu_throughput.py``   tokens/s and MFU of 10m and 106m, vs ``transformers``; the engine's MFU
``memory_4b``    ``gpu_memory_4b.py``    peak memory of the 4b model on one GPU, with and without checkpointing
``packing``      ``gpu_packing.py``      packed vs padded batches: same losses? faster? in the model and the engine
===============  ======================  =========================================================================

Each section runs in its own process with a time limit; a failure or a timeout is recorded and the next section
runs anyway. Results go to ``OUT/gpu_check.json``, ``OUT/gpu_check.md`` and ``OUT/gpu_check.log`` (all child
output), and a summary is printed. The exit code is 1 when a section failed or timed out. Each script runs its own
sections alone with the same options, into ``OUT/<script>.json/.md/.log``.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: installs carried wheels, then this
    python benchmarks/gpu_check.py --out /tmp/gpu      # GPU, all sections (about 4-6 minutes on an H100)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry   # CPU, tiny sizes: exercises every code path

The training corpus is ``--corpus``/``--vocab-dir``, else the demo corpus in ``results/tokenized`` with
``results/reference/vocab`` (carry them to the GPU machine), else a seeded synthetic corpus.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_backends
import gpu_environment
import gpu_memory_4b
import gpu_packing
import gpu_throughput
from _gpu_common import main

SECTIONS = [
    *gpu_environment.SECTIONS,
    *gpu_backends.SECTIONS,
    *gpu_throughput.SECTIONS,
    *gpu_memory_4b.SECTIONS,
    *gpu_packing.SECTIONS,
]

if __name__ == "__main__":
    sys.exit(main(SECTIONS, report_name="gpu_check", description=__doc__.splitlines()[0]))
