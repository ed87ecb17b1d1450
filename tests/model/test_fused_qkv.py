"""``ModelConfig.fused_qkv``: one (3H x H) projection for Q, K, V is the same model as three, and Hugging Face
exports and imports keep the three separate matrices."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from geneformer_workflow.model import (
    GeneformerForMaskedLM,
    fuse_qkv,
    load_hf_directory,
    save_hf_directory,
    split_fused_qkv,
    to_hf_state_dict,
    unpad,
)
from safetensors.torch import load_file

QKV = ("query", "key", "value")


def fused_twin(model: GeneformerForMaskedLM) -> GeneformerForMaskedLM:
    """A fused-QKV model whose ``qkv`` weights are the concatenations of ``model``'s query / key / value."""
    fused = GeneformerForMaskedLM(dataclasses.replace(model.config, fused_qkv=True))
    fused.load_state_dict(fuse_qkv(model.state_dict()), strict=True)
    return fused.train(model.training)


def test_fused_layer_has_one_projection_and_the_same_parameter_count(tiny_cfg):
    plain = GeneformerForMaskedLM(tiny_cfg)
    fused = GeneformerForMaskedLM(dataclasses.replace(tiny_cfg, fused_qkv=True))
    attention = fused.encoder_layers[0].attention.self
    assert not any(hasattr(attention, name) for name in QKV)
    assert attention.qkv.weight.shape == (3 * tiny_cfg.hidden_size, tiny_cfg.hidden_size)
    count = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in fused.parameters()) == count
    assert "bert.encoder.layer.1.attention.self.qkv.bias" in fused.state_dict()


def run_both(model, fused, batch, packed: bool):
    """Loss of both models on ``batch`` (padded, or packed with ``unpad``), backward done; returns the outputs."""
    if packed:
        ids, labels, seqs = unpad(batch.input_ids, batch.attention_mask, batch.labels)
        args, kwargs = (ids,), {"labels": labels, "packed": seqs}
    else:
        args, kwargs = (batch.input_ids, batch.attention_mask), {"labels": batch.labels}
    outputs = model(*args, **kwargs), fused(*args, **kwargs)
    for out in outputs:
        out.loss.backward()
    return outputs


def gradients(model, fused):
    """Both models' gradients under the unfused names (the fused ``qkv`` gradient split in three)."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    fused_grads = split_fused_qkv({name: p.grad for name, p in fused.named_parameters()})
    assert fused_grads.keys() == grads.keys()
    return grads, fused_grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_equals_unfused_exactly_in_logits_loss_and_last_layer_gradients(random_model, padded_batch, packed):
    model = random_model.train()  # dropout is 0 in the tiny config; train mode exercises the training path
    fused = fused_twin(model)
    out, out_fused = run_both(model, fused, padded_batch, packed)
    torch.testing.assert_close(out_fused.logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(out_fused.loss, out.loss, rtol=0, atol=0)
    grads, fused_grads = gradients(model, fused)
    last = f"bert.encoder.layer.{model.config.num_hidden_layers - 1}."
    exact = [name for name in grads if name.startswith((last, "cls."))]
    assert len(exact) == 16 + 5  # the last layer (its q, k, v included) and the head
    for name in exact:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=0, atol=0, msg=name)
    # Below the last layer, the input gradient of a fused projection is one GEMM summing over 3H, where the three
    # projections sum three GEMMs over H: the same sum in another float order. fp32 rounding only, hence:
    for name in grads.keys() - exact:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_gradients_equal_unfused_to_float64_rounding(random_model, padded_batch):
    model = random_model.double().train()
    fused = fused_twin(model).double()
    run_both(model, fused, padded_batch, packed=False)
    grads, fused_grads = gradients(model, fused)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-12, atol=1e-15, msg=name)


def test_split_and_fuse_are_inverse_and_keep_prefixes():
    gen = torch.Generator().manual_seed(0)
    state = {"module.bert.encoder.layer.3.attention.self.qkv.weight": torch.randn(6, 2, generator=gen),
             "module.bert.encoder.layer.3.attention.self.qkv.bias": torch.randn(6, generator=gen),
             "module.cls.predictions.bias": torch.randn(4, generator=gen)}  # fmt: skip
    split = split_fused_qkv(state)
    assert sorted(split) == sorted(
        [f"module.bert.encoder.layer.3.attention.self.{p}.{w}" for p in QKV for w in ("weight", "bias")]
        + ["module.cls.predictions.bias"]
    )
    weight = state["module.bert.encoder.layer.3.attention.self.qkv.weight"]
    assert torch.equal(split["module.bert.encoder.layer.3.attention.self.key.weight"], weight[2:4])
    fused = fuse_qkv(split)
    assert fused.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(fused[key], tensor)


def test_a_qkv_key_beside_query_key_value_is_kept_and_refused_by_the_export(random_model):
    state = random_model.state_dict()
    stray = "bert.encoder.layer.0.attention.self.qkv.weight"
    query = state["bert.encoder.layer.0.attention.self.query.weight"]
    split = split_fused_qkv({**state, stray: torch.zeros(3 * query.shape[0], query.shape[1])})
    assert torch.equal(split["bert.encoder.layer.0.attention.self.query.weight"], query)  # not overwritten
    assert stray in split
    with pytest.raises(ValueError, match=r"neither Hugging Face BertForMaskedLM keys.*attention\.self\.qkv\.weight"):
        to_hf_state_dict({**state, stray: torch.zeros(3 * query.shape[0], query.shape[1])})


def test_fusing_a_layer_without_all_three_projections_is_refused():
    state = {f"bert.encoder.layer.0.attention.self.{p}.weight": torch.zeros(2, 2) for p in ("query", "key")}
    with pytest.raises(ValueError, match=r"lack one of query / key / value: \['bert.encoder.layer.0.attention.self"):
        fuse_qkv(state)


def test_export_of_a_fused_model_equals_the_unfused_export_and_loads_in_transformers(
    random_model, padded_batch, tmp_path
):
    fused = fused_twin(random_model).eval()
    save_hf_directory(random_model, tmp_path / "plain")
    save_hf_directory(fused, tmp_path / "fused")
    plain_tensors = load_file(tmp_path / "plain" / "model.safetensors")
    fused_tensors = load_file(tmp_path / "fused" / "model.safetensors")
    assert fused_tensors.keys() == plain_tensors.keys()
    assert not any(".qkv." in key for key in fused_tensors)
    for key, tensor in plain_tensors.items():
        assert torch.equal(fused_tensors[key], tensor), key
    exported_config = (tmp_path / "fused" / "config.json").read_text()
    assert exported_config == (tmp_path / "plain" / "config.json").read_text()
    assert "fused_qkv" not in exported_config

    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "fused", attn_implementation="eager").eval()
    b = padded_batch
    with torch.no_grad():
        expected = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        ours = fused(b.input_ids, b.attention_mask).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_loading_a_hf_directory_into_the_fused_layout_concatenates_query_key_value(random_model, tmp_path):
    save_hf_directory(random_model, tmp_path / "plain")
    fused = load_hf_directory(tmp_path / "plain", fused_qkv=True)
    assert fused.config.fused_qkv
    assert fused.cls.predictions.decoder.weight is fused.bert.embeddings.word_embeddings.weight  # still tied
    attention = random_model.encoder_layers[1].attention.self
    expected = torch.cat([getattr(attention, p).weight for p in QKV])
    assert torch.equal(fused.encoder_layers[1].attention.self.qkv.weight, expected)
    round_trip = to_hf_state_dict(fused.state_dict())
    for key, tensor in to_hf_state_dict(random_model.state_dict()).items():
        assert torch.equal(round_trip[key], tensor), key
