"""Timed training steps for the GPU check's model sections (throughput, packing, 4b memory).

Builds a Geneformer model or ``transformers.BertForMaskedLM`` of a preset, makes synthetic masked batches, times
forward + backward (+ AdamW) steps with bf16 autocast on CUDA, and counts the model FLOPs of a step for MFU:
:func:`geneformer_workflow.train.metrics.model_flops`, the same count as the engine's ``train/mfu``.
Not a script; imported by the ``benchmarks/gpu_*.py`` scripts after :mod:`_gpu_common` (which makes the package
importable).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

V1_VOCAB, V2_VOCAB = 25_426, 20_275  # Geneformer V1 (2,048 tokens) and V2 (4,096 tokens) vocabularies
# (preset, micro-batch, tokens, vocabulary) of the throughput and packing sections on a GPU
GPU_SHAPES = [("10m", 12, 2_048, V1_VOCAB), ("106m", 8, 4_096, V2_VOCAB)]

Batch = tuple[Any, Any, Any]  # (input ids, attention mask, labels), each (B, T)


def masked_batch(batch: int, length: int, vocab: int, device: Any, seed: int) -> Batch:
    """Full-length cells of random gene ids, 15 % masked (``<mask>`` = 1): (ids, attention mask, labels)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=gen)
    chosen = torch.rand(ids.shape, generator=gen) < 0.15
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.ones_like(ids), ids)
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


@contextlib.contextmanager
def bf16_autocast(device: Any) -> Iterator[None]:
    """bf16 autocast on CUDA (as the engine's none/ddp backends), nothing on CPU."""
    import torch

    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def build_model(
    preset: str,
    *,
    vocab: int,
    length: int,
    device: Any,
    checkpointing: bool,
    fused_qkv: bool = False,
    compile_backend: str | None = None,
    **options: Any,
) -> Any:
    """A Geneformer model of ``preset`` built on the meta device and initialised on ``device`` (fast for 4b).

    ``fused_qkv`` and ``compile_backend`` (e.g. ``"inductor"``; None = eager) are the ``model.fused_qkv`` and
    ``model.compile`` / ``model.compile_backend`` levers of the training config; ``options`` are other
    ``ModelConfig`` fields (e.g. ``packed_attention="jagged"``, ``attention_probs_dropout_prob=0.0``).
    """
    import torch
    from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig, compile_encoder_layers

    cfg = ModelConfig.from_preset(preset, vocab_size=vocab, max_position_embeddings=length,
                                  gradient_checkpointing=checkpointing, fused_qkv=fused_qkv, **options)  # fmt: skip
    with torch.device("meta"):
        model = GeneformerForMaskedLM(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    if compile_backend is not None:
        compile_encoder_layers(model, backend=compile_backend)
    return model.train()


def transformers_model(preset: str, *, vocab: int, length: int, device: Any) -> Callable[[Any, Any, Any], Any]:
    """``transformers.BertForMaskedLM`` of ``preset`` (sdpa, logits for every token), called as ours is.

    The callable takes ``(ids, mask, labels)`` and has the model's ``parameters`` method, so :func:`measure_steps`
    and :func:`adamw` take it as they take our model.
    """
    import torch
    import transformers
    from geneformer_workflow.model import ModelConfig

    cfg = ModelConfig.from_preset(preset, vocab_size=vocab, max_position_embeddings=length)
    torch.manual_seed(0)
    with device:
        model = transformers.BertForMaskedLM._from_config(cfg.to_hf_config(), attn_implementation="sdpa").train()

    def call(ids: Any, mask: Any, labels: Any) -> Any:
        return model(input_ids=ids, attention_mask=mask, labels=labels)

    call.parameters = model.parameters  # type: ignore[attr-defined]
    return call


def cuda_sync(device: Any) -> None:
    """Wait for queued CUDA work (no-op on CPU), so wall-clock timings are real."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: Any) -> None:
    """Free cached blocks and restart the peak-memory count (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: Any) -> dict[str, float]:
    """``{"peak_memory_gb": ...}`` since the last reset on CUDA; empty on CPU (no allocator statistics)."""
    import torch

    return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9} if device.type == "cuda" else {}


def step_counts(tiny: bool) -> tuple[int, int]:
    """``(untimed warm-up steps, timed steps)`` of a microbenchmark: (3, 10) on a GPU, (1, 2) in tiny mode."""
    return (1, 2) if tiny else (3, 10)


def measure_steps(model: Any, batch: Batch, *, warmup: int, steps: int, optimizer: Any) -> float:
    """Seconds per step (forward, backward and, with an optimizer, AdamW) after ``warmup`` untimed steps."""
    device = batch[0].device
    for i in range(warmup + steps):
        if i == warmup:
            cuda_sync(device)
            started = time.perf_counter()
        with bf16_autocast(device):
            loss = model(*batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    cuda_sync(device)
    return (time.perf_counter() - started) / steps


def adamw(model: Any, device: Any, lr: float = 1e-4) -> Any:
    """AdamW over ``model.parameters()``, fused on CUDA (as the engine)."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")


def flops_per_step(model: Any, batch: Batch) -> float:
    """Model FLOPs of one forward + backward on ``batch`` of full-length cells (every cell has t = T tokens)."""
    from geneformer_workflow.train.metrics import model_flops

    ids, _, labels = batch
    b, t = ids.shape
    return model_flops(
        model.config.to_dict(), n_tokens=b * t, sum_sq_lengths=b * t * t, n_masked=int((labels != -100).sum())
    )


def mfu_percent(flops: float, seconds: float, device: Any) -> float | None:
    """Model FLOPs per second as a percentage of the device's peak dense bf16 FLOP/s (None on CPU)."""
    from geneformer_workflow.train.metrics import peak_flops

    peak = peak_flops(device)
    return None if peak is None else 100 * flops / seconds / peak
