"""Shared fixtures for the model tests: a tiny config, a padded batch, and a HF twin of a model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers
from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig

PAD = 0
MASK = 1


@dataclass(frozen=True)
class Tolerances:
    """Tolerances of the fp32 CPU comparisons."""

    logits_atol: float = 1e-5
    logits_rtol: float = 1e-5
    loss_atol: float = 1e-6
    grad_atol: float = 1e-6
    grad_rtol: float = 1e-5


@pytest.fixture
def tol() -> Tolerances:
    return Tolerances()


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


def tiny_config() -> ModelConfig:
    """Small enough for milliseconds, large enough for 4 heads and 2 layers. Dropout off (eval comparisons)."""
    return ModelConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 = token
    labels: torch.Tensor  # (B, T), -100 = ignore


@pytest.fixture
def padded_batch(tiny_cfg: ModelConfig) -> Batch:
    """Three cells of 12, 7 and 3 tokens, right-padded to 12, with about a third of the tokens masked."""
    gen = torch.Generator().manual_seed(0)
    lengths = [12, 7, 3]
    seq_len = max(lengths)
    input_ids = torch.randint(2, tiny_cfg.vocab_size, (len(lengths), seq_len), generator=gen)
    attention_mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids[attention_mask == 0] = PAD
    chosen = (torch.rand(input_ids.shape, generator=gen) < 0.35) & attention_mask.bool()
    chosen[2, 0] = True  # every cell has at least one masked token
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    input_ids = torch.where(chosen, torch.full_like(input_ids, MASK), input_ids)
    return Batch(input_ids, attention_mask, labels)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (LayerNorms and biases included) a non-trivial random value, so that a wiring
    mistake cannot hide behind ones, zeros or near-uniform attention."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0) * 0.5)


def _hf_twin(model: GeneformerForMaskedLM, attn_implementation: str = "eager") -> transformers.BertForMaskedLM:
    """A ``transformers.BertForMaskedLM`` holding the same weights, in the same train/eval mode."""
    hf_cfg = model.config.to_hf_config()
    hf = transformers.BertForMaskedLM._from_config(hf_cfg, attn_implementation=attn_implementation)
    hf.load_state_dict(model.state_dict(), strict=True)  # same keys, tied aliases included
    hf.train(model.training)
    return hf


@pytest.fixture
def randomize():
    """``randomize(model, seed=0)``: see ``_randomize``."""
    return _randomize


@pytest.fixture
def hf_twin():
    """``hf_twin(model, attn_implementation="eager")``: see ``_hf_twin``."""
    return _hf_twin


@pytest.fixture
def random_model(tiny_cfg: ModelConfig) -> GeneformerForMaskedLM:
    """The tiny model with randomized weights, in eval mode."""
    torch.manual_seed(0)
    model = GeneformerForMaskedLM(tiny_cfg)
    _randomize(model)
    return model.eval()
