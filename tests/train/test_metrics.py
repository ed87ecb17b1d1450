"""Metric records, the console line and the wandb switch."""

from __future__ import annotations

import json

from geneformer_workflow.train.distributed import DistributedConfig, Runtime
from geneformer_workflow.train.metrics import MetricsLogger, format_line, start_wandb, truncate_metrics
from torch import device


def runtime(rank: int) -> Runtime:
    return Runtime(dist=DistributedConfig(rank=rank, world_size=2), device=device("cpu"))


def test_only_rank_zero_writes_metrics(tmp_path):
    for rank in (1, 0):
        logger = MetricsLogger(tmp_path, runtime(rank), wandb_cfg={"mode": "disabled"}, config={}, console=False)
        logger.log(3, {"train/loss": 1.5})
        logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 3, "train/loss": 1.5}]


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    records = [json.dumps({"step": s, "train/loss": 1.0}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(records) + "\n")
    truncate_metrics(tmp_path, 3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_wandb_mode_env_variable_wins_over_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert start_wandb(tmp_path, {"mode": "offline", "project": "p"}, {}) is None


def test_console_line_shows_the_main_metrics():
    line = format_line(7, {"train/loss": 2.0, "train/learning_rate": 1e-3, "validation/loss": 1.9})
    assert line == "step 7 | loss 2.0000 | lr 1.00e-03 | val_loss 1.9000"
