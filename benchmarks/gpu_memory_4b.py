"""Does the 4b model train on one GPU, and in how much memory? (GPU check section ``memory_4b``)

The 4b model (2.9 B parameters, built on the meta device and initialised on the GPU), bf16 autocast, 4,096 tokens:
peak memory, tokens/s and MFU (as in ``gpu_throughput.py``) of forward + backward with activation checkpointing at
micro-batch 1, 2 and 4; micro-batch 1 without checkpointing; micro-batch 1 plus one fused AdamW step (fp32 weights,
gradients and moments). An out-of-memory is a result (``oom``), not a failure. ``--dry-run``: the sanity shape at
128 tokens on CPU, micro-batches 1 and 2.

    python benchmarks/gpu_memory_4b.py --out /tmp/gpu            # GPU; writes OUT/gpu_memory_4b.json/.md/.log
    python benchmarks/gpu_memory_4b.py --dry-run --out /tmp/gpu  # CPU

``benchmarks/gpu_check.py`` runs this section with the others; options and report as there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_steps as model_steps
from _gpu_common import Context, Section, main


def memory_case(model: Any, batch: int, length: int, vocab: int, *, checkpointing: bool, ctx: Context) -> dict:
    """Peak memory and speed of forward + backward for one micro-batch size (OOM is a result, not an error)."""
    import torch

    device = next(model.parameters()).device
    model.set_gradient_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    case = {"micro_batch": batch, "length": length, "checkpointing": checkpointing}
    try:
        data = model_steps.masked_batch(batch, length, vocab, device, seed=batch)
        model_steps.reset_peak_memory(device)
        seconds = model_steps.measure_steps(model, data, warmup=1, steps=1 if ctx.tiny else 2, optimizer=None)
        flops = model_steps.flops_per_step(model, data)
        case |= {"seconds_per_step": seconds, "tokens_per_second": batch * length / seconds,
                 "mfu_percent": model_steps.mfu_percent(flops, seconds, device)}  # fmt: skip
        case |= model_steps.peak_memory_gb(device)
    except torch.cuda.OutOfMemoryError as err:
        case["oom"] = str(err).splitlines()[0]
    finally:
        model.zero_grad(set_to_none=True)
    print(f"--- 4b memory: {json.dumps(case)}", flush=True)
    return case


def optimizer_case(model: Any, length: int, vocab: int) -> dict[str, Any]:
    """Peak memory of micro-batch 1 with checkpointing plus one fused AdamW step (fp32 weights, grads, moments)."""
    import torch

    device = next(model.parameters()).device
    model.set_gradient_checkpointing(True)
    case: dict[str, Any] = {"micro_batch": 1, "length": length, "checkpointing": True, "adamw_step": True}
    try:
        model_steps.reset_peak_memory(device)
        optimizer = model_steps.adamw(model, device, lr=1e-5)
        data = model_steps.masked_batch(1, length, vocab, device, seed=7)
        case["seconds_per_step"] = model_steps.measure_steps(model, data, warmup=0, steps=1, optimizer=optimizer)
        case |= model_steps.peak_memory_gb(device)
        del optimizer
    except torch.cuda.OutOfMemoryError as err:
        case["oom"] = str(err).splitlines()[0]
    print(f"--- 4b memory: {json.dumps(case)}", flush=True)
    return case


def section_memory_4b(ctx: Context) -> dict[str, Any]:
    """The 4b model on one device: memory of forward + backward with activation checkpointing."""
    import torch
    from geneformer_workflow.model import num_parameters

    tiny, full = ("sanity", 128, 1_000, (1, 2)), ("4b", 4_096, model_steps.V2_VOCAB, (1, 2, 4))
    preset, length, vocab, batches = tiny if ctx.tiny else full
    device = torch.device(ctx.device)
    model = model_steps.build_model(preset, vocab=vocab, length=length, device=device, checkpointing=True)
    result: dict[str, Any] = {"preset": preset, "parameters": num_parameters(model.config)}
    if device.type == "cuda":
        result["weights_gb"] = torch.cuda.memory_allocated(device) / 1e9
    cases = [memory_case(model, b, length, vocab, checkpointing=True, ctx=ctx) for b in batches]
    cases.append(memory_case(model, 1, length, vocab, checkpointing=False, ctx=ctx))
    cases.append(optimizer_case(model, length, vocab))
    result["cases"] = cases
    return result


def memory_label(case: dict[str, Any]) -> str:
    """``b2``, ``b1 no-ckpt``, ``b1 +AdamW``: a memory case's short name."""
    label = f"b{case['micro_batch']}" + ("" if case["checkpointing"] else " no-ckpt")
    return label + (" +AdamW" if case.get("adamw_step") else "")


def memory_value(case: dict[str, Any]) -> str:
    """Peak GB, OOM, or ok (CPU: no allocator statistics)."""
    if "peak_memory_gb" in case:
        return f"{case['peak_memory_gb']:.1f} GB"
    return "OOM" if "oom" in case else "ok"


def summarize(res: dict[str, Any]) -> str:
    """Peak memory of each case."""
    return ", ".join(f"{memory_label(c)}: {memory_value(c)}" for c in res.get("cases", []))


SECTIONS = [Section("memory_4b", section_memory_4b, 150, summarize)]

if __name__ == "__main__":
    sys.exit(main(SECTIONS, report_name="gpu_memory_4b", description=__doc__.splitlines()[0]))
