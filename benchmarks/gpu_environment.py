"""What the GPU machine has, and whether the GPU tests pass there (GPU check sections ``environment``, ``tests``).

``environment``  torch / CUDA / device, the peak bf16 FLOP/s used for MFU, which optional packages import
``tests``        ``pytest -m gpu tests/train tests/model`` (skipped in ``--dry-run``: the GPU tests skip themselves),
                 without ``tests/train/test_speed_options_gpu.py`` (inductor compilations: run it alone)

    python benchmarks/gpu_environment.py --out /tmp/gpu            # GPU; writes OUT/gpu_environment.json/.md/.log
    python benchmarks/gpu_environment.py --dry-run --out /tmp/gpu  # CPU

``benchmarks/gpu_check.py`` runs these sections with the others; options and report as there.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import Context, Section, SectionError, SectionSkipped, main, package_versions, run_command, tail

TESTS_LIMIT_S = 120


def section_environment(ctx: Context) -> dict[str, Any]:
    """Versions, device, the peak FLOP/s behind MFU, and which optional packages import."""
    import torch
    from geneformer_workflow.train.metrics import peak_flops

    result: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "corpus": ctx.corpus_note,
        "packages": package_versions(("megatron_fsdp", "transformer_engine", "hydra", "omegaconf", "transformers")),
    }
    if ctx.on_gpu:
        if not torch.cuda.is_available():
            msg = "no CUDA device is visible (use --dry-run on a CPU machine)"
            raise RuntimeError(msg)
        device = torch.device("cuda", 0)
        props = torch.cuda.get_device_properties(device)
        peak = peak_flops(device)
        result |= {
            "device": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gb": props.total_memory / 1e9,
            "multiprocessors": props.multi_processor_count,
            "peak_bf16_tflops": None if peak is None else peak / 1e12,
            "fp8_capable": (props.major, props.minor) >= (8, 9),
        }
    return result


def section_tests(ctx: Context) -> dict[str, Any]:
    """``pytest -m gpu`` over the training and model tests.

    A test module that cannot be imported on the GPU machine (a package missing there) is reported, not fatal:
    only failed GPU tests fail the section.
    """
    if ctx.tiny:
        msg = "dry run: the GPU tests skip themselves without CUDA"
        raise SectionSkipped(msg)
    # test_speed_options_gpu.py compiles with inductor for minutes: run alone (docs/training.md), not in this section
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/train", "tests/model", "-q", "-rA",
               "-p", "no:cacheprovider", "--timeout", "100", "--continue-on-collection-errors",
               "--ignore", "tests/train/test_speed_options_gpu.py"]  # fmt: skip
    proc = run_command(command, timeout_s=TESTS_LIMIT_S - 10)
    print(proc.stdout, flush=True)
    summary = tail(proc.stdout, 1)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR ")]
    result = {"summary": summary, "exit_code": proc.returncode, "collection_errors": errors}
    ran = " passed" in summary or " failed" in summary
    if not ran and proc.returncode in (0, 5):
        msg = f"no GPU test ran: {summary}"
        raise SectionSkipped(msg)
    if not ran or " failed" in summary:
        msg = f"GPU tests failed or did not run (exit {proc.returncode}): {summary}"
        raise SectionError(msg, result)
    return result


def summarize_environment(res: dict[str, Any]) -> str:
    """``NVIDIA H200, torch 2.11.0, peak 989.0 TFLOP/s``."""
    return f"{res.get('device', 'cpu')}, torch {res.get('torch')}, peak {res.get('peak_bf16_tflops')} TFLOP/s"


SECTIONS = [
    Section("environment", section_environment, 60, summarize_environment, summarize_failed=False),
    Section("tests", section_tests, TESTS_LIMIT_S, lambda res: res.get("summary", ""), summarize_failed=False),
]

if __name__ == "__main__":
    sys.exit(main(SECTIONS, report_name="gpu_environment", description=__doc__.splitlines()[0]))
