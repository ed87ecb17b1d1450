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
from pathlib import Path
from typing import Any

import torch

from .distributed import Runtime

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory of this process (CPU RSS, plus CUDA allocations on GPU)."""
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1e-9 if sys.platform == "darwin" else 1e-6
    out = {"train/cpu_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if device.type == "cuda":
        out["train/gpu_memory_allocated_max_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop lines logged after ``after_step`` (a resumed run logs those steps again)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


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
