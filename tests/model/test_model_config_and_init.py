"""ModelConfig round trips, presets and parameter counts, and the weight initialisation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from geneformer_workflow.model import MODEL_PRESETS, GeneformerForMaskedLM, ModelConfig, num_parameters

V1 = {"vocab_size": 25_426, "max_position_embeddings": 2048}  # Genecorpus-30M vocabulary and length


def test_config_round_trips_through_dict_and_json(tiny_cfg):
    d = json.loads(json.dumps(tiny_cfg.to_dict()))
    assert ModelConfig.from_dict(d) == tiny_cfg


def test_config_round_trips_through_hf_bert_config(tiny_cfg):
    hf = tiny_cfg.to_hf_config()
    assert isinstance(hf, transformers.BertConfig)
    assert hf.hidden_act == "relu"
    assert hf.architectures == ["BertForMaskedLM"]
    assert hf.tie_word_embeddings
    assert ModelConfig.from_hf_config(hf) == tiny_cfg
    again = transformers.BertConfig.from_dict(json.loads(hf.to_json_string()))
    assert ModelConfig.from_hf_config(again) == tiny_cfg


def test_from_dict_rejects_unknown_keys(tiny_cfg):
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict({**tiny_cfg.to_dict(), "hidden_sise": 3})


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"is_decoder": True}, "is_decoder"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ],
    ids=["gelu", "untied", "decoder", "relative-positions"],
)
def test_from_hf_config_rejects_what_the_architecture_cannot_do(tiny_cfg, override, match):
    hf = tiny_cfg.to_hf_config()
    for key, value in override.items():
        setattr(hf, key, value)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


def test_config_rejects_heads_that_do_not_divide_hidden_size():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(vocab_size=10, hidden_size=30, num_attention_heads=4)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="10m"):
        ModelConfig.from_preset("10M", vocab_size=10)


def test_presets_have_the_geneformer_shapes():
    shapes = {
        name: (p["num_hidden_layers"], p["hidden_size"], p["num_attention_heads"], p["intermediate_size"])
        for name, p in MODEL_PRESETS.items()
    }
    assert shapes == {
        "sanity": (2, 64, 2, 128),
        "10m": (6, 256, 4, 512),
        "106m": (12, 768, 12, 3072),
        "4b": (36, 2560, 40, 10240),
    }


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("sanity", 1e6, 2e6), ("10m", 10e6, 11e6), ("106m", 104e6, 108e6), ("4b", 2.8e9, 3.0e9)],
)
def test_preset_parameter_count(preset, low, high):
    """Counted on the meta device (no memory), the tied decoder once; matches the closed form and HF."""
    cfg = ModelConfig.from_preset(preset, **V1)
    with torch.device("meta"):
        ours = sum(p.numel() for p in GeneformerForMaskedLM(cfg).parameters())
        theirs = sum(p.numel() for p in transformers.BertForMaskedLM(cfg.to_hf_config()).parameters())
    print(f"{preset}: {ours:,} parameters")
    assert ours == num_parameters(cfg) == theirs
    assert low < ours < high


def test_init_weights_statistics():
    cfg = ModelConfig.from_preset("10m", vocab_size=2000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = GeneformerForMaskedLM(cfg)
    _assert_initialised(model, cfg)


def test_meta_device_model_initialises_after_to_empty_with_decoder_tied():
    cfg = ModelConfig.from_preset("10m", vocab_size=2000, max_position_embeddings=512)
    with torch.device("meta"):
        model = GeneformerForMaskedLM(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    _assert_initialised(model, cfg)


def _assert_initialised(model: GeneformerForMaskedLM, cfg: ModelConfig) -> None:
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert torch.count_nonzero(emb[cfg.pad_token_id]) == 0
    for name, p in model.named_parameters():
        if "LayerNorm" in name:
            expected = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
            assert torch.equal(p, expected), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:  # Linear and Embedding weights ~ N(0, initializer_range)
            values = p[torch.arange(p.shape[0]) != cfg.pad_token_id] if p is emb else p
            n = values.numel()  # 4 standard errors of the sample mean and std
            assert abs(values.mean().item()) < 4 * cfg.initializer_range / n**0.5, name
            assert values.std().item() == pytest.approx(cfg.initializer_range, rel=4 / (2 * n) ** 0.5), name
