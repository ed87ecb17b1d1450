"""How fast does the model train on one GPU, and how close to the hardware's peak? (GPU check section ``throughput``)

bf16 forward + backward + fused AdamW on full-length cells of random genes (15 % masked): the 10m model at
12 x 2,048 tokens (V1 vocabulary) and the 106m model at 8 x 4,096 (V2 vocabulary). For each: seconds per step,
tokens/s, model TFLOP/s, MFU and peak memory; then ``transformers.BertForMaskedLM`` (sdpa, logits for every token)
on the same batch (``ours_speedup`` = its step time / ours); then the training engine's own metrics
(``train/mfu``, tokens/s) for 40 steps of the 10m config on the corpus.

Speed levers of the training config, each measured on and off (they stay off by default until measured faster):
for each shape, ``<preset>_fused_qkv`` (``model.fused_qkv``: one QKV GEMM), ``<preset>_compile`` (``model.compile``:
each layer compiled with inductor) and ``<preset>_compile_fused_qkv`` have the same keys as ``<preset>`` plus
``first_step_seconds`` (the compile time shows here) and ``speedup_vs_plain`` (``<preset>``'s step time / theirs);
``engine_levers`` is the engine run with both levers on (GPU only). ``<preset>_micro_batch_x2``: the plain model at
twice the micro-batch (more tokens per kernel where memory allows), with ``tokens_per_second_vs_plain``. A lever
that fails (e.g. out of memory) is recorded, not fatal.
``--dry-run``: the sanity shape at 2 x 128 on CPU (no MFU: a CPU has no known peak), compiled with the ``eager``
backend (Dynamo traces the layers, no code is generated: the path is checked in seconds), and 4 engine steps of the
sanity config.

MFU (model FLOPs utilisation) = model FLOPs of a step / seconds per step / the device's peak dense bf16 FLOP/s
(``train.metrics.peak_flops``: 989 TFLOP/s for an H100 SXM or an H200). The model FLOPs are
``train.metrics.model_flops``, the count behind the engine's ``train/mfu`` (Kaplan et al. 2020; PaLM, Chowdhery
et al. 2022, Appendix B): with L layers, width H, FFN width I, vocabulary V, and a step of B cells of T tokens,

    6 · L · (4·H² + 2·H·I) · B·T      dense layers (Q, K, V, output, two FFN matrices), per token
  + 12 · L · H · B·T²                 attention scores and values: every cell attends over all T tokens
  + 6 · (H² + H·V) · masked tokens    the MLM head, which the model runs on masked positions only

(6 = 2 FLOPs per multiply-add x 3 for forward + backward.) The attention term is counted: it is 60 % of the 10m
model's FLOPs at 2,048 tokens and 46 % of the 106m model's at 4,096. Padding, LayerNorms, softmax and activation
recomputation are not counted (useful work only), so MFU with checkpointing is lower than the hardware's utilisation.
The transformers reference gets no MFU: its step time is compared with ours (``ours_speedup``).

    python benchmarks/gpu_throughput.py --out /tmp/gpu            # GPU; writes OUT/gpu_throughput.json/.md/.log
    python benchmarks/gpu_throughput.py --dry-run --out /tmp/gpu  # CPU

``benchmarks/gpu_check.py`` runs this section with the others; options and report as there.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_steps as model_steps
from _gpu_common import Context, Parts, Section, engine_overrides, main, percent, run_engine, train_metrics

# (result key suffix, model.fused_qkv, model.compile): the levers measured against the plain model
LEVERS = [("fused_qkv", True, False), ("compile", False, True), ("compile_fused_qkv", True, True)]


def compile_backend(ctx: Context) -> str:
    """inductor on a GPU; eager in the dry run (Dynamo traces the layers, no code generation: seconds, not minutes)."""
    return "eager" if ctx.tiny else "inductor"


def timed_steps(
    implementation: str,
    preset: str,
    batch: int,
    length: int,
    vocab: int,
    ctx: Context,
    *,
    fused_qkv: bool = False,
    compile_layers: bool = False,
) -> dict:
    """Seconds per training step (AdamW included) on full-length cells, tokens/s and peak memory.

    ``implementation`` is ``"ours"`` (then also model FLOP/s and MFU) or ``"transformers"`` (``BertForMaskedLM``);
    ``fused_qkv`` and ``compile_layers`` switch our model's levers. The first warm-up step is timed on its own
    (``first_step_seconds``: compilation happens there).
    """
    import torch

    device = torch.device(ctx.device)
    if compile_layers:  # a fresh start: no graphs (nor dimensions Dynamo made dynamic) left by another shape
        torch._dynamo.reset()
    if implementation == "ours":
        backend = compile_backend(ctx) if compile_layers else None
        model = model_steps.build_model(preset, vocab=vocab, length=length, device=device, checkpointing=False,
                                        fused_qkv=fused_qkv, compile_backend=backend)  # fmt: skip
    else:
        model = model_steps.transformers_model(preset, vocab=vocab, length=length, device=device)
    data = model_steps.masked_batch(batch, length, vocab, device, seed=0)
    warmup, steps = model_steps.step_counts(ctx.tiny)
    model_steps.reset_peak_memory(device)
    optimizer = model_steps.adamw(model, device)
    first = model_steps.measure_steps(model, data, warmup=0, steps=1, optimizer=optimizer)
    seconds = model_steps.measure_steps(model, data, warmup=warmup - 1, steps=steps, optimizer=optimizer)
    out = {"preset": preset, "micro_batch": batch, "length": length, "seconds_per_step": seconds,
           "tokens_per_second": batch * length / seconds, "first_step_seconds": first}  # fmt: skip
    if implementation == "ours":
        out |= {"fused_qkv": fused_qkv, "compile": compile_layers}
    if implementation == "ours":
        flops = model_steps.flops_per_step(model, data)
        out |= {"vocab": vocab, "model_tflops_per_second": flops / seconds / 1e12,
                "mfu_percent": model_steps.mfu_percent(flops, seconds, device)}  # fmt: skip
    return out | model_steps.peak_memory_gb(device)


def engine_run(ctx: Context, *, levers: bool = False) -> dict[str, Any]:
    """The engine's own metrics (``train/mfu``, tokens/s) for a short bf16 10m run on the corpus; with ``levers``,
    with ``model.fused_qkv`` and ``model.compile`` on (4 minutes allowed: compilation, and again for the final
    validation in eval mode)."""
    steps, log_every = (4, 2) if ctx.tiny else (40, 20)
    config = "sanity" if ctx.tiny else "10m"
    overrides = engine_overrides(steps, log_every)
    if levers:
        overrides += ["model.fused_qkv=true", "model.compile=true", f"model.compile_backend={compile_backend(ctx)}"]
    run_dir = Path(ctx.workdir) / f"engine_{config}{'_levers' if levers else ''}"
    records = run_engine(ctx, config, run_dir, overrides, timeout_s=240 if levers else 120)
    out = {"config": config, "steps": steps, "metrics": train_metrics(records[-1])}  # the last: steady state
    return out | ({"overrides": overrides[-3:]} if levers else {})


def section_throughput(ctx: Context) -> dict[str, Any]:
    """Throughput and MFU of 10m and 106m (tiny: the sanity shape), and the engine's MFU metric."""
    parts = Parts()
    for shape in [("sanity", 2, 128, 1_000)] if ctx.tiny else model_steps.GPU_SHAPES:
        preset = shape[0]
        mine = parts.run(preset, partial(timed_steps, "ours", *shape, ctx))
        for suffix, fused_qkv, compile_layers in LEVERS:  # each lever on; its failure is recorded, not fatal
            run = partial(timed_steps, "ours", *shape, ctx, fused_qkv=fused_qkv, compile_layers=compile_layers)
            lever = parts.run(f"{preset}_{suffix}", run, fatal=False)
            if "seconds_per_step" in mine and "seconds_per_step" in lever:
                lever["speedup_vs_plain"] = mine["seconds_per_step"] / lever["seconds_per_step"]
        preset_name, batch, length, vocab = shape
        doubled = parts.run(f"{preset}_micro_batch_x2", partial(timed_steps, "ours", preset_name, 2 * batch, length,
                                                                 vocab, ctx), fatal=False)  # fmt: skip
        if "tokens_per_second" in mine and "tokens_per_second" in doubled:
            doubled["tokens_per_second_vs_plain"] = doubled["tokens_per_second"] / mine["tokens_per_second"]
        # the reference on the same shape; its failure is recorded, not fatal
        reference = parts.run(f"{preset}_transformers", partial(timed_steps, "transformers", *shape, ctx), fatal=False)
        if "seconds_per_step" in mine and "seconds_per_step" in reference:
            reference["ours_speedup"] = reference["seconds_per_step"] / mine["seconds_per_step"]
    parts.run("engine", partial(engine_run, ctx), echo=False)
    if not ctx.tiny:  # the engine with the levers on is checked on CPU by tests/train/test_speed_options.py
        parts.run("engine_levers", partial(engine_run, ctx, levers=True), fatal=False, echo=False)
    return parts.finish()


def summarize(res: dict[str, Any]) -> str:
    """Tokens/s and MFU of each model and lever, transformers' relative speed, and the engine's ``train/mfu``."""
    detail = ", ".join(
        f"{k}: {v['tokens_per_second']:,.0f} tok/s, "
        + (f"ours {v['ours_speedup']:.2f}x" if "ours_speedup" in v else f"MFU {percent(v.get('mfu_percent'))}")
        + (f" ({v['speedup_vs_plain']:.2f}x plain)" if "speedup_vs_plain" in v else "")
        + (f" ({v['tokens_per_second_vs_plain']:.2f}x plain tok/s)" if "tokens_per_second_vs_plain" in v else "")
        for k, v in res.items() if "tokens_per_second" in v
    )  # fmt: skip
    for key, label in (("engine", "engine"), ("engine_levers", "engine with levers")):
        engine = res.get(key, {}).get("metrics", {})
        if "train/mfu" in engine:
            detail += f"; {label} train/mfu {engine['train/mfu']:.1f}%"
    return detail


SECTIONS = [Section("throughput", section_throughput, 480, summarize)]  # with 4 inductor compilations + engine

if __name__ == "__main__":
    sys.exit(main(SECTIONS, report_name="gpu_throughput", description=__doc__.splitlines()[0]))
