"""Do packed batches give the same results as padded ones, and are they faster? (GPU check section ``packing``)

On right-padded cells of random length in [T/2, T] (15 % of real tokens masked):

* ``<preset>_equal``: the bf16 loss of one batch padded vs packed (``model.unpad``; flash varlen attention on CUDA)
  and the largest logit difference;
* ``<preset>_speed``: step time and non-pad tokens/s of ours padded, ours packed (``unpad`` inside the step) and
  ``transformers.BertForMaskedLM`` (sdpa, padded) for 10m at 12 x 2,048 and 106m at 8 x 4,096; packed also with
  ``model.packed_attention=jagged`` (``ours_packed_jagged``: one nested-tensor SDPA call per layer with
  Geneformer's attention dropout, instead of one per cell) and without attention dropout
  (``ours_packed_no_attention_dropout``: flash varlen), giving ``jagged_speedup_vs_per_cell`` and
  ``jagged_dropout_cost`` (the issue's goal: < 0.10);
* ``engine``: the training engine (``--engine-config``, default 10m) on the corpus with ``data.packing`` false and
  true (``packing_True``), and packed with ``model.packed_attention=jagged`` (``packing_True_jagged``), 40 steps
  each; the padded run is profiled with ``logging.profile_steps`` (``profile_padded``).

``--dry-run``: the sanity shape at 4 x 128 on CPU (fp32) and 4 engine steps of the sanity config.

    python benchmarks/gpu_packing.py --out /tmp/gpu            # GPU; writes OUT/gpu_packing.json/.md/.log
    python benchmarks/gpu_packing.py --dry-run --out /tmp/gpu  # CPU

``benchmarks/gpu_check.py`` runs this section with the others; options and report as there.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_steps as model_steps
from _gpu_common import Context, Parts, Section, engine_overrides, main, run_engine, train_metrics


def variable_batch(batch: int, length: int, vocab: int, device: Any, seed: int) -> model_steps.Batch:
    """Right-padded cells of lengths uniform in [length / 2, length], 15 % of real tokens masked."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, vocab, (batch, length), generator=gen) * mask
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.ones_like(ids), ids)
    return ids.to(device), mask.to(device), labels.to(device)


def packed_matches_padded(preset: str, vocab: int, length: int, ctx: Context) -> dict[str, Any]:
    """bf16 loss of the same batch padded vs packed (flash varlen on CUDA), and their largest logit difference."""
    import torch
    from geneformer_workflow.model import unpad

    device = torch.device(ctx.device)
    model = model_steps.build_model(preset, vocab=vocab, length=length, device=device, checkpointing=False).eval()
    ids, mask, labels = variable_batch(4, length, vocab, device, seed=1)
    with torch.no_grad(), model_steps.bf16_autocast(device):
        padded = model(ids, mask, labels)
        ids_1T, labels_1T, packed = unpad(ids, mask, labels)
        out = model(ids_1T, labels=labels_1T, packed=packed)
    return {"loss_padded": float(padded.loss), "loss_packed": float(out.loss),
            "max_abs_logit_difference": float((padded.logits.float() - out.logits.float()).abs().max())}  # fmt: skip


def packing_microbenchmark(preset: str, batch: int, length: int, vocab: int, ctx: Context) -> dict[str, Any]:
    """Step time of ours padded, ours packed (``unpad`` in the step) and transformers on variable-length cells."""
    import torch
    from geneformer_workflow.model import unpad

    device = torch.device(ctx.device)
    data = variable_batch(batch, length, vocab, device, seed=0)
    real_tokens = int(data[1].sum())
    warmup, steps = model_steps.step_counts(ctx.tiny)
    build = partial(model_steps.build_model, preset, vocab=vocab, length=length, device=device, checkpointing=False)
    ours = build()
    jagged = build(packed_attention="jagged")
    no_attention_dropout = build(attention_probs_dropout_prob=0.0)
    theirs = model_steps.transformers_model(preset, vocab=vocab, length=length, device=device)

    def packed(model: Any) -> Any:
        def call(i: Any, a: Any, y: Any) -> Any:
            ids_1T, labels_1T, cells = unpad(i, a, y)
            return model(ids_1T, labels=labels_1T, packed=cells)

        call.parameters = model.parameters  # type: ignore[attr-defined]  # for model_steps.adamw
        return call

    out: dict[str, Any] = {"preset": preset, "micro_batch": batch, "length": length, "real_tokens": real_tokens}
    variants = {"ours_padded": ours, "ours_packed": packed(ours), "ours_packed_jagged": packed(jagged),
                "ours_packed_no_attention_dropout": packed(no_attention_dropout), "transformers": theirs}  # fmt: skip
    for name, call in variants.items():
        optimizer = model_steps.adamw(call, device)
        seconds = model_steps.measure_steps(call, data, warmup=warmup, steps=steps, optimizer=optimizer)
        out[name] = {"seconds_per_step": seconds, "non_pad_tokens_per_second": real_tokens / seconds}
    seconds = {name: out[name]["seconds_per_step"] for name in variants}
    for name in ("ours_padded", "ours_packed", "ours_packed_jagged"):
        out[f"{name}_speedup_vs_transformers"] = seconds["transformers"] / seconds[name]
    out["jagged_speedup_vs_per_cell"] = seconds["ours_packed"] / seconds["ours_packed_jagged"]
    out["jagged_dropout_cost"] = seconds["ours_packed_jagged"] / seconds["ours_packed_no_attention_dropout"] - 1
    return out


def engine_packing_runs(ctx: Context) -> dict[str, Any]:
    """The engine on the corpus, padded vs packed batches; the padded run profiles a few steady-state steps."""
    steps, log_every = (4, 2) if ctx.tiny else (40, 10)
    config = "sanity" if ctx.tiny else ctx.engine_config
    results: dict[str, Any] = {}
    for name, packing, kernel in (("packing_False", False, "auto"), ("packing_True", True, "auto"),
                                  ("packing_True_jagged", True, "jagged")):  # fmt: skip
        run_dir = Path(ctx.workdir) / f"engine_{config}_{name}"
        overrides = [*engine_overrides(steps, log_every), f"data.packing={str(packing).lower()}",
                     f"model.packed_attention={kernel}"]  # fmt: skip
        if not packing:
            overrides.append(f"logging.profile_steps=[{steps - 3},{steps - 2}]")
        try:
            records = run_engine(ctx, config, run_dir, overrides)
        except RuntimeError as err:
            results[name] = {"error": str(err)}
            continue
        results[name] = train_metrics(records[-2])  # the last logged step before the profile
        for table in sorted((run_dir / "profile").glob("*.txt")):
            results["profile_padded"] = table.read_text()[:6000]
            print(results["profile_padded"], flush=True)
    return results


def section_packing(ctx: Context) -> dict[str, Any]:
    """Packed vs padded batches: equal results, step time vs transformers, and the engine with data.packing."""
    import torch

    parts = Parts({"varlen_attention": varlen_available()})
    for preset, batch, length, vocab in [("sanity", 4, 128, 1_000)] if ctx.tiny else model_steps.GPU_SHAPES:
        parts.run(f"{preset}_equal", partial(packed_matches_padded, preset, vocab, length, ctx))
        parts.run(f"{preset}_speed", partial(packing_microbenchmark, preset, batch, length, vocab, ctx))
        if ctx.on_gpu:
            torch.cuda.empty_cache()
    engine = parts.run("engine", partial(engine_packing_runs, ctx), echo=False)
    parts.failed += [f"engine {k}" for k, v in engine.items() if isinstance(v, dict) and "error" in v]
    return parts.finish()


def varlen_available() -> bool:
    """Whether this torch has flash ``varlen_attn`` (used for packed batches on CUDA)."""
    from geneformer_workflow.model.layers import _flash_varlen

    return _flash_varlen() is not None


def summarize(res: dict[str, Any]) -> str:
    """Packed and padded speed vs transformers per shape, and the engine's tokens/s padded and packed."""
    parts = [f"varlen {res.get('varlen_attention')}"]
    for key, value in res.items():
        if key.endswith("_speed") and "ours_packed" in value:
            parts.append(f"{key[:-6]}: packed {value['ours_packed_speedup_vs_transformers']:.2f}x (jagged "
                         f"{value['ours_packed_jagged_speedup_vs_transformers']:.2f}x, dropout cost "
                         f"{value['jagged_dropout_cost']:+.0%}), padded "
                         f"{value['ours_padded_speedup_vs_transformers']:.2f}x vs transformers")  # fmt: skip
    engine = res.get("engine", {})
    for name in ("packing_False", "packing_True", "packing_True_jagged"):
        tok = engine.get(name, {}).get("train/unpadded_tokens_per_second")
        if tok:
            parts.append(f"engine {name}: {tok:,.0f} tok/s")
    return ", ".join(parts)


SECTIONS = [Section("packing", section_packing, 200, summarize)]

if __name__ == "__main__":
    sys.exit(main(SECTIONS, report_name="gpu_packing", description=__doc__.splitlines()[0]))
