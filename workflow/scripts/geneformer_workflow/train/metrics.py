"""Metrics: ``run_dir/metrics.jsonl``, a console line and (optionally) Weights & Biases, on rank 0 only.

Names and units (one JSON object per line, always with ``"step"``):

==========================================  =====================================================================
``train/loss``                              masked-LM cross-entropy (nats per masked token), token-weighted over
                                            all ranks and all steps since the previous log line
``train/learning_rate``                     LR of the last step
``train/grad_norm``                         global L2 norm of the gradients before clipping, last step (absent
                                            when ``training.max_grad_norm`` is null)
``train/step_time``                         seconds per optimizer step, wall clock, averaged since the last log
``train/tokens_per_second``                 token slots incl. padding per second, all ranks
``train/unpadded_tokens_per_second``        real tokens per second, all ranks
``train/unpadded_tokens_per_second_per_rank``  the same divided by the world size
``train/tokens_seen``                       real training tokens so far, all ranks
``train/epoch``                             epoch of the last step (0-based)
``train/cpu_max_rss_gb``                    peak resident memory of rank 0 (GB = 1e9 bytes)
``train/gpu_memory_allocated_max_gb``       peak CUDA memory allocated on rank 0 (GPU runs only)
``train/tflops_per_second_per_rank``        model FLOPs (:func:`model_flops`) per second per rank, in TFLOP/s
``train/mfu``                               model FLOPs utilisation in percent: the above / the device's peak
                                            dense bf16 FLOP/s (CUDA devices in :data:`PEAK_BF16_FLOPS`, or
                                            ``logging.peak_tflops``; absent when the peak is unknown)
``validation/loss``                         cross-entropy on the validation cells' fixed masks
``validation/accuracy``                     fraction of masked validation tokens predicted exactly (argmax)
``validation/masked_tokens``                masked tokens evaluated
``validation/time``                         seconds the evaluation took
==========================================  =====================================================================
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from ..run_dir import METRICS_FILE as METRICS_FILE
from ..run_dir import read_jsonl
from .distributed import Runtime

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id.txt"

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's data sheets, matched in this order against
# torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("B200", 2250.0e12),
    ("L40S", 362.05e12),
)


def model_flops(shape: Mapping[str, int], *, n_tokens: int, sum_sq_lengths: int, n_masked: int) -> float:
    """Model FLOPs of one forward + backward pass over a micro-batch (MFU's numerator).

    The usual count (Kaplan et al. 2020, "Scaling laws", 6 FLOPs per parameter and token; PaLM, Chowdhery et al.
    2022, Appendix B, for the attention term and the definition of MFU; nanoGPT's ``estimate_mfu``): a multiply-add
    is 2 FLOPs and the backward pass costs twice the forward, hence the factors 6 and 12. With L layers, width H,
    FFN width I, vocabulary V and cells of real length t:

    * dense layers, per real token: ``6 · L · (4·H² + 2·H·I)`` (Q, K, V, output projection and the two FFN matrices);
    * attention scores and values, per cell: ``12 · L · H · t²`` (bidirectional, so the full t × t matrix);
    * MLM head, per masked token only (the model runs the head on masked positions): ``6 · (H² + H·V)``.

    Padding, embedding look-ups, LayerNorms, softmax and the recomputation of activation checkpointing are not
    counted: MFU measures useful work, not what the hardware ran.

    Args:
        shape: ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``, ``vocab_size`` (a ``ModelConfig``
            as a dict, or the ``model`` config block).
        n_tokens: Real (unpadded) tokens.
        sum_sq_lengths: Sum of the squared real lengths of the cells.
        n_masked: Masked tokens (rows of the MLM head).

    Example:
        >>> model_flops({"num_hidden_layers": 1, "hidden_size": 2, "intermediate_size": 4, "vocab_size": 10},
        ...             n_tokens=3, sum_sq_lengths=9, n_masked=1)
        936.0
    """
    layers, hidden = int(shape["num_hidden_layers"]), int(shape["hidden_size"])
    ffn, vocab = int(shape["intermediate_size"]), int(shape["vocab_size"])
    dense = 6.0 * layers * (4 * hidden * hidden + 2 * hidden * ffn) * n_tokens
    attention = 12.0 * layers * hidden * sum_sq_lengths
    head = 6.0 * (hidden * hidden + hidden * vocab) * n_masked
    return dense + attention + head


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: ``peak_tflops`` if given, else looked up for CUDA devices.

    Returns None (no MFU metric) for CPUs and unknown GPUs unless ``peak_tflops`` is set.
    """
    if peak_tflops is not None:
        return float(peak_tflops) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def throughput_metrics(flops: float, elapsed_s: float, world_size: int, peak: float | None) -> dict[str, float]:
    """``train/tflops_per_second_per_rank`` and, when the peak is known, ``train/mfu`` (percent)."""
    per_rank = flops / max(elapsed_s, 1e-9) / world_size
    out = {"train/tflops_per_second_per_rank": per_rank / 1e12}
    if peak:
        out["train/mfu"] = 100.0 * per_rank / peak
    return out


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory of this process (CPU RSS, plus CUDA allocations on GPU)."""
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1e-9 if sys.platform == "darwin" else 1e-6
    out = {"train/cpu_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if device.type == "cuda":
        out["train/gpu_memory_allocated_max_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop records logged after ``after_step`` (a resumed run logs those steps again).

    A partial last line (the previous attempt was killed, or the disk filled up, mid-write) is dropped with a
    warning; a broken line before it raises ``ValueError`` naming the file and the line (see :func:`read_jsonl`).
    The file is rewritten atomically, and only when that changes it.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    text = "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= after_step)  # as MetricsLogger
    if text.encode() != path.read_bytes():
        write_text_atomic(path, text)


class MetricsLogger:
    """Writes metrics on rank 0; other ranks' calls are no-ops."""

    def __init__(
        self, run_dir: Path, runtime: Runtime, *, wandb_cfg: dict[str, Any], config: dict[str, Any], console: bool
    ) -> None:
        self.enabled = runtime.dist.is_main
        self.console = console and self.enabled
        self._file = None
        self._wandb = None
        if not self.enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._file = (Path(run_dir) / METRICS_FILE).open("a", buffering=1)
        self._wandb = start_wandb(Path(run_dir), wandb_cfg, config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record."""
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self.console:
            print(format_line(step, metrics), flush=True)

    def close(self) -> None:
        """Flush and close the file and the wandb run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def format_line(step: int, metrics: dict[str, float]) -> str:
    """The console progress line."""
    parts = [f"step {step}"]
    names = {
        "train/loss": "loss {:.4f}",
        "train/learning_rate": "lr {:.2e}",
        "train/grad_norm": "grad_norm {:.3f}",
        "train/step_time": "{:.3f} s/step",
        "train/unpadded_tokens_per_second": "{:,.0f} tok/s",
        "train/mfu": "mfu {:.1f}%",
        "train/cpu_max_rss_gb": "rss {:.2f} GB",
        "train/gpu_memory_allocated_max_gb": "gpu {:.2f} GB",
        "validation/loss": "val_loss {:.4f}",
        "validation/accuracy": "val_acc {:.4f}",
    }
    parts += [fmt.format(metrics[key]) for key, fmt in names.items() if key in metrics]
    return " | ".join(parts)


def start_wandb(run_dir: Path, wandb_cfg: dict[str, Any], config: dict[str, Any]) -> Any:
    """Start a wandb run unless the mode (``WANDB_MODE`` env var first, then ``wandb.mode``) is ``disabled``.

    The run id is stored in ``run_dir`` so a resumed job continues the same wandb run.
    """
    mode = os.environ.get("WANDB_MODE") or wandb_cfg.get("mode", "offline")
    if mode == "disabled":
        return None
    import wandb  # lazy: importing wandb costs about a second

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    started = time.perf_counter()
    run = wandb.init(
        project=wandb_cfg.get("project"),
        entity=wandb_cfg.get("entity"),
        name=wandb_cfg.get("name"),
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config=config,
    )
    log.info("wandb (%s) started in %.1f s", mode, time.perf_counter() - started)
    return run
