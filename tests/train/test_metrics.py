"""Metric records, the console line and the wandb switch."""

from __future__ import annotations

import json

import pytest
from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig
from geneformer_workflow.train.distributed import DistributedConfig, Runtime
from geneformer_workflow.train.metrics import (
    MetricsLogger,
    format_line,
    model_flops,
    peak_flops,
    start_wandb,
    throughput_metrics,
    truncate_metrics,
)
from torch import device, nn


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


def test_model_flops_are_six_per_weight_per_token_plus_attention():
    cfg = ModelConfig.from_preset("sanity", vocab_size=1_000, max_position_embeddings=64)
    model = GeneformerForMaskedLM(cfg)
    layer_weights = sum(m.weight.numel() for m in model.encoder_layers.modules() if isinstance(m, nn.Linear))
    head = model.cls.predictions
    head_weights = head.transform.dense.weight.numel() + head.decoder.weight.numel()
    lengths, masked = [10, 30], 6
    expected = (
        6 * layer_weights * sum(lengths)  # every dense layer weight: one multiply-add per token, x3 for backward
        + 12 * cfg.num_hidden_layers * cfg.hidden_size * sum(t * t for t in lengths)  # QK^T and AV
        + 6 * head_weights * masked  # the MLM head runs on masked tokens only
    )
    got = model_flops(cfg.to_dict(), n_tokens=sum(lengths), sum_sq_lengths=sum(t * t for t in lengths), n_masked=6)
    assert got == expected


def test_mfu_needs_a_known_peak():
    assert peak_flops(device("cpu")) is None
    assert peak_flops(device("cpu"), 2.5) == pytest.approx(2.5e12)
    assert throughput_metrics(4e12, 2.0, 2, None) == {"train/tflops_per_second_per_rank": 1.0}
    got = throughput_metrics(4e12, 2.0, 2, 4e12)
    assert got == pytest.approx({"train/tflops_per_second_per_rank": 1.0, "train/mfu": 25.0})
