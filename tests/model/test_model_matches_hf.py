"""Our model computes the same function as ``transformers.BertForMaskedLM`` (ReLU, post-LN), on CPU in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from geneformer_workflow.model import GeneformerForMaskedLM

ATTN_IMPLEMENTATIONS = ["eager", "sdpa"]


def test_state_dict_keys_are_hf_bert_for_masked_lm_keys(random_model, hf_twin):
    hf = hf_twin(random_model)
    assert list(random_model.state_dict()) == list(hf.state_dict())
    assert random_model.cls.predictions.decoder.weight is random_model.bert.embeddings.word_embeddings.weight
    assert random_model.cls.predictions.decoder.bias is random_model.cls.predictions.bias


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
def test_logits_match_hf_at_every_non_pad_position(random_model, hf_twin, padded_batch, tol, attn_implementation):
    hf = hf_twin(random_model, attn_implementation)
    b = padded_batch
    with torch.no_grad():
        ours = random_model(b.input_ids, b.attention_mask).logits  # (B, T, V)
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], atol=tol.logits_atol, rtol=tol.logits_rtol)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
def test_loss_matches_hf(random_model, hf_twin, padded_batch, tol, attn_implementation):
    hf = hf_twin(random_model, attn_implementation)
    b = padded_batch
    with torch.no_grad():
        ours = random_model(b.input_ids, b.attention_mask, labels=b.labels)
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
    assert ours.loss.dtype == torch.float32
    torch.testing.assert_close(ours.loss, theirs.loss, atol=tol.loss_atol, rtol=tol.logits_rtol)


def test_hidden_states_match_hf_including_embeddings_output(random_model, hf_twin, padded_batch, tol):
    hf = hf_twin(random_model)
    b = padded_batch
    with torch.no_grad():
        last, ours = random_model.encode(b.input_ids, b.attention_mask, output_hidden_states=True)
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states
    real = b.attention_mask.bool()
    assert len(ours) == len(theirs) == random_model.config.num_hidden_layers + 1
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o[real], t[real], atol=tol.logits_atol, rtol=tol.logits_rtol)
    assert torch.equal(last, ours[-1])
    assert torch.equal(random_model.encode(b.input_ids, b.attention_mask), last)


def test_training_gradients_match_hf(random_model, hf_twin, padded_batch, tol):
    """Dropout is 0 in the tiny config, so train mode is deterministic and the backward passes must agree."""
    random_model.train()
    hf = hf_twin(random_model, "sdpa")
    b = padded_batch
    random_model(b.input_ids, b.attention_mask, labels=b.labels).loss.backward()
    hf(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in random_model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=tol.grad_atol, rtol=tol.grad_rtol, msg=name)


def test_pad_token_ids_do_not_change_non_pad_logits(random_model, padded_batch):
    b = padded_batch
    other_ids = b.input_ids.clone()
    other_ids[b.attention_mask == 0] = 7  # any real token id in the padded slots
    with torch.no_grad():
        a = random_model(b.input_ids, b.attention_mask).logits
        c = random_model(other_ids, b.attention_mask).logits
    real = b.attention_mask.bool()
    torch.testing.assert_close(a[real], c[real], atol=1e-6, rtol=1e-6)


def test_padding_length_does_not_change_a_cells_logits(random_model, padded_batch, tol):
    b = padded_batch
    n = int(b.attention_mask[1].sum())
    with torch.no_grad():
        in_batch = random_model(b.input_ids, b.attention_mask).logits[1, :n]
        alone = random_model(b.input_ids[1:2, :n], b.attention_mask[1:2, :n]).logits[0]
    torch.testing.assert_close(in_batch, alone, atol=tol.logits_atol, rtol=tol.logits_rtol)


def test_masked_only_head_equals_full_head_gathered_at_labels(random_model, padded_batch, tol):
    b = padded_batch
    with torch.no_grad():
        full = random_model(b.input_ids, b.attention_mask).logits  # (B, T, V)
        masked = random_model(b.input_ids, b.attention_mask, labels=b.labels)
    chosen = b.labels != -100
    assert masked.num_masked == int(chosen.sum())
    assert masked.logits.shape == (masked.num_masked, random_model.config.vocab_size)
    torch.testing.assert_close(masked.logits, full[chosen], atol=tol.logits_atol, rtol=tol.logits_rtol)
    full_loss = F.cross_entropy(full.flatten(0, 1), b.labels.flatten())
    torch.testing.assert_close(masked.loss, full_loss, atol=tol.loss_atol, rtol=tol.logits_rtol)


def test_batch_without_masked_tokens_gives_zero_loss_and_a_backward_pass(random_model, padded_batch):
    b = padded_batch
    random_model.train()
    out = random_model(b.input_ids, b.attention_mask, labels=torch.full_like(b.labels, -100))
    assert out.num_masked == 0
    assert out.logits.shape == (0, random_model.config.vocab_size)
    assert out.loss.item() == 0.0
    out.loss.backward()  # connected graph: no error, zero gradients
    assert random_model.cls.predictions.transform.dense.weight.grad is not None


def test_missing_attention_mask_means_no_padding(random_model, padded_batch):
    ids = padded_batch.input_ids
    with torch.no_grad():
        torch.testing.assert_close(random_model(ids).logits, random_model(ids, torch.ones_like(ids)).logits)


def test_sequence_longer_than_max_positions_raises(random_model, tiny_cfg):
    ids = torch.full((1, tiny_cfg.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        random_model(ids)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_cfg, padded_batch, randomize):
    """With dropout on, checkpointing must restore the RNG state so that the recomputed masks are the same."""
    tiny_cfg.hidden_dropout_prob = 0.1
    tiny_cfg.attention_probs_dropout_prob = 0.1
    b = padded_batch
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = GeneformerForMaskedLM(tiny_cfg).train()
        randomize(model)
        model.set_gradient_checkpointing(enabled)
        calls = []
        model.encoder_layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # noqa: B023
        torch.manual_seed(1)
        loss = model(b.input_ids, b.attention_mask, labels=b.labels).loss
        loss.backward()
        assert len(calls) == (2 if enabled else 1)  # checkpointing re-runs the layer in the backward pass
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-7, rtol=1e-6, msg=name)


def test_dropout_is_active_in_train_mode_only(tiny_cfg, padded_batch):
    tiny_cfg.hidden_dropout_prob = 0.1
    tiny_cfg.attention_probs_dropout_prob = 0.1
    model = GeneformerForMaskedLM(tiny_cfg)
    b = padded_batch
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(b.input_ids, b.attention_mask).logits, model(b.input_ids, b.attention_mask).logits)
        model.train()
        assert not torch.equal(
            model(b.input_ids, b.attention_mask).logits, model(b.input_ids, b.attention_mask).logits
        )
