"""The training curves of the report: loss and learning rate, throughput and step time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from geneformer_workflow.atomic import atomic_files
from geneformer_workflow.report._common import pyplot, save_to
from geneformer_workflow.run_dir import FINAL_FILE, METRICS_FILE, final_checkpoint, read_jsonl

__all__ = ["plot_training_curves", "read_metrics"]


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` as one row per step (the last value logged wins), sorted by step.

    A partial last line (a killed run) is dropped with a warning; a broken line before it raises ``ValueError``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        msg = f"{path} not found: plot the training curves of a run directory of `gfw train`"
        raise ValueError(msg)
    frame = pd.DataFrame(read_jsonl(path))
    if frame.empty:
        return pd.DataFrame({"step": []})
    return frame.groupby("step", sort=True).last().reset_index()


def plot_training_curves(run_dir: str | Path, loss_out: str | Path, throughput_out: str | Path) -> None:
    """Loss (train and validation) and learning rate; throughput and step time, against the optimizer step.

    The two figures appear together or not at all (``atomic.atomic_files``).
    """
    with atomic_files([loss_out, throughput_out], inputs=[run_dir]) as (tmp_loss, tmp_throughput):
        _plot_training_curves(run_dir, tmp_loss, tmp_throughput)


def _plot_training_curves(run_dir: str | Path, loss_out: Path, throughput_out: Path) -> None:
    metrics = read_metrics(run_dir)
    vocab_size = _vocab_size(Path(run_dir))
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4))
    _line(ax_loss, metrics, "train/loss", "training loss (masked tokens)", "tab:blue")
    _line(ax_loss, metrics, "validation/loss", "validation loss (fixed masks)", "tab:orange", marker="o")
    if vocab_size:
        ax_loss.axhline(math.log(vocab_size), color="gray", linestyle=":", label=f"uniform guess, ln {vocab_size:,}")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats per masked token)", title="masked-LM loss")
    ax_loss.legend(fontsize=8)
    _line(ax_lr, metrics, "train/learning_rate", "learning rate", "tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate schedule")
    fig.tight_layout()
    save_to(fig, loss_out)

    fig, (ax_tps, ax_time) = plt.subplots(1, 2, figsize=(12, 4))
    _line(ax_tps, metrics, "train/unpadded_tokens_per_second", "real tokens / s (all ranks)", "tab:blue")
    _line(ax_tps, metrics, "train/tokens_per_second", "token slots incl. padding / s", "tab:gray", linestyle="--")
    ax_tps.set(xlabel="step", ylabel="tokens per second", title=_throughput_title(metrics))
    ax_tps.set_ylim(bottom=0)
    ax_tps.legend(fontsize=8)
    _line(ax_time, metrics, "train/step_time", "seconds per step", "tab:purple")
    ax_time.set(xlabel="step", ylabel="seconds per optimizer step", title="step time")
    ax_time.set_ylim(bottom=0)
    fig.tight_layout()
    save_to(fig, throughput_out)


def _line(ax: Any, metrics: pd.DataFrame, key: str, label: str, color: str, **style: Any) -> None:
    if key in metrics:
        rows = metrics[["step", key]].dropna()
        ax.plot(rows["step"], rows[key], label=label, color=color, **style)


def _throughput_title(metrics: pd.DataFrame) -> str:
    key = "train/unpadded_tokens_per_second"
    values = metrics[key].dropna() if key in metrics else pd.Series(dtype=float)
    steady = values.iloc[1:] if len(values) > 1 else values  # the first interval includes start-up
    return f"throughput: median {steady.median():,.0f} real tokens/s" if len(steady) else "throughput"


def _vocab_size(run_dir: Path) -> int | None:
    if not (run_dir / FINAL_FILE).is_file():
        return None
    config = final_checkpoint(run_dir) / "model_config.json"  # refuses a path that leaves the run directory
    return int(json.loads(config.read_text())["vocab_size"]) if config.is_file() else None
