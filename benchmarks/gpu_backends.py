"""Does every training backend train, checkpoint and resume on one GPU? (GPU check section ``backends``)

``gfw train`` (sanity config, bf16) under ``torchrun --nproc_per_node 1`` with backend none, fsdp2 and mfsdp
(megatron-fsdp): 10 steps with a checkpoint, then a resume to 12 (fsdp2, mfsdp); each backend's losses are compared
with the unwrapped model's (``max_loss_difference_vs_none``). ``--dry-run``: CPU, fp32, 3 steps and a resume to 4;
mfsdp is skipped (it needs CUDA).

    python benchmarks/gpu_backends.py --out /tmp/gpu            # GPU; writes OUT/gpu_backends.json/.md/.log
    python benchmarks/gpu_backends.py --dry-run --out /tmp/gpu  # CPU

``benchmarks/gpu_check.py`` runs this section with the others; options and report as there.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (
    Context,
    Section,
    SectionError,
    main,
    root_cause,
    run_command,
    tail,
    train_command,
    train_records,
)

BACKENDS = ("none", "fsdp2", "mfsdp")
COMPARED = ("train/unpadded_tokens_per_second", "train/mfu", "train/gpu_memory_allocated_max_gb", "train/step_time")


def run_backend(ctx: Context, backend: str, *, steps: int, resume_steps: int) -> dict[str, Any]:
    """Train ``steps`` steps with ``backend`` (checkpoint at the end), then resume to ``resume_steps`` if larger."""
    if backend == "mfsdp" and not ctx.on_gpu:
        return {"status": "skipped", "reason": "megatron-fsdp needs CUDA"}
    run_dir = Path(ctx.workdir) / f"backend_{backend}"
    overrides = [f"backend.name={backend}", "logging.log_every=1", f"logging.eval_every={steps}",
                 f"checkpoint.save_every={steps}"]  # fmt: skip
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "ok"}
    for max_steps in sorted({steps, resume_steps}):
        proc = run_command(train_command(ctx, "sanity", run_dir, [*overrides, f"training.max_steps={max_steps}"]),
                           timeout_s=120)  # fmt: skip
        print(f"--- backend {backend}, max_steps {max_steps}: exit {proc.returncode}\n{tail(proc.stdout, 15)}")
        if proc.returncode != 0:
            error = f"exit {proc.returncode} at max_steps={max_steps}: {root_cause(proc.stdout)}"
            return {"status": "failed", "error": error, "log_tail": tail(proc.stdout, 40)}
    records = train_records(run_dir)
    final = json.loads((run_dir / "final.json").read_text())
    result["losses"] = {r["step"]: r["train/loss"] for r in records}
    result["final"] = final
    result["resumed_to"] = final["step"] if resume_steps > steps else None
    result["last_metrics"] = {k: records[-1][k] for k in COMPARED if k in records[-1]}
    result["seconds"] = time.perf_counter() - started
    if sorted(result["losses"]) != list(range(1, max(steps, resume_steps) + 1)):
        result |= {"status": "failed", "error": f"logged steps {sorted(result['losses'])}"}
    return result


def section_backends(ctx: Context) -> dict[str, Any]:
    """none, fsdp2 and megatron-fsdp on one device: train, checkpoint, resume, and compare losses."""
    steps, resume = (3, 4) if ctx.tiny else (10, 12)
    results = {b: run_backend(ctx, b, steps=steps, resume_steps=resume if b != "none" else steps) for b in BACKENDS}
    reference = results["none"].get("losses", {})
    for backend, res in results.items():
        common = sorted(set(reference) & set(res.get("losses", {})))
        if backend != "none" and common:
            res["max_loss_difference_vs_none"] = max(abs(res["losses"][s] - reference[s]) for s in common)
    failed = [b for b, r in results.items() if r["status"] == "failed"]
    if failed:
        msg = f"backends failed: {failed}: " + "; ".join(f"{b}: {results[b].get('error')}" for b in failed)
        raise SectionError(msg, results)
    return results


def summarize(res: dict[str, Any]) -> str:
    """``none: ok (final loss 9.1), fsdp2: ...`` per backend."""
    return ", ".join(
        f"{b}: {r.get('status')} (final loss {r.get('final', {}).get('train_loss', 'n/a')})" for b, r in res.items()
    )


SECTIONS = [Section("backends", section_backends, 200, summarize)]

if __name__ == "__main__":
    sys.exit(main(SECTIONS, report_name="gpu_backends", description=__doc__.splitlines()[0]))
