"""Weight-decay groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig
from geneformer_workflow.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


@pytest.fixture(scope="module")
def model():
    return GeneformerForMaskedLM(ModelConfig.from_preset("sanity", vocab_size=50, max_position_embeddings=16))


def test_biases_and_layernorm_weights_get_no_weight_decay(model):
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay["names"])
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in no_decay["names"]
    assert "bert.encoder.layer.1.attention.self.query.bias" in no_decay["names"]
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay["names"]
    assert "bert.embeddings.word_embeddings.weight" in decay["names"]
    n_params = len(list(model.parameters()))  # the tied decoder counts once
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_optimizer_refuses_lr_inside_adamw_kwargs(model):
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0, adamw_kwargs={"lr": 1.0})


def test_linear_warmup_then_linear_decay_values():
    values = [lr_factor(s, warmup_steps=4, decay_steps=8, schedule="linear", min_lr_ratio=0.0) for s in range(10)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0])


def test_cosine_decay_reaches_the_floor():
    f = [lr_factor(s, warmup_steps=2, decay_steps=6, schedule="cosine", min_lr_ratio=0.1) for s in range(8)]
    assert f[:2] == pytest.approx([0.5, 1.0])
    assert f[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[5:] == pytest.approx([0.1, 0.1, 0.1])


def test_scheduler_drives_the_optimizer_lr(model):
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, adamw_kwargs={})
    sched = build_scheduler(opt, name="linear", warmup_steps=2, decay_steps=4, min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])
    assert all(g["lr"] == pytest.approx(0.0) for g in opt.param_groups)


def test_unknown_schedule_names_the_key():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match=r"scheduler\.name"):
        build_scheduler(opt, name="step", warmup_steps=0, decay_steps=1, min_lr_ratio=0.0)
