"""Packed (unpadded, ``cu_seqlens``) batches give the same per-token outputs as padded ones (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from geneformer_workflow.model import PackedSequences, unpad


def test_position_ids_restart_for_every_sequence():
    packed = PackedSequences.from_lengths([3, 1, 4])
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 4
    assert packed.position_ids().tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("lengths", [[], [2, 0, 3]])
def test_empty_sequences_are_refused(lengths):
    with pytest.raises(ValueError, match="positive lengths"):
        PackedSequences.from_lengths(lengths)


def test_unpad_keeps_row_major_order_and_refuses_left_padding(padded_batch):
    b = padded_batch
    ids_1T, labels_1T, packed = unpad(b.input_ids, b.attention_mask, b.labels)
    real = b.attention_mask.bool()
    assert packed.lengths == (12, 7, 3)
    assert ids_1T[0].tolist() == b.input_ids[real].tolist()
    assert labels_1T[0].tolist() == b.labels[real].tolist()
    with pytest.raises(ValueError, match="right-padded"):
        unpad(b.input_ids, b.attention_mask.flip(1))


def test_packed_and_padded_hidden_states_are_equal(random_model, padded_batch, tol):
    b = padded_batch
    ids_1T, _, packed = unpad(b.input_ids, b.attention_mask)
    with torch.no_grad():
        padded_BTH = random_model.encode(b.input_ids, b.attention_mask)
        packed_1TH = random_model.encode(ids_1T, packed=packed)
    torch.testing.assert_close(packed_1TH[0], padded_BTH[b.attention_mask.bool()], atol=tol.logits_atol, rtol=0)


def test_packed_and_padded_loss_logits_and_gradients_are_equal(random_model, padded_batch, tol):
    b = padded_batch
    model = random_model.train()  # dropout is 0 in tiny_cfg: training mode is deterministic
    padded = model(b.input_ids, b.attention_mask, labels=b.labels)
    padded.loss.backward()
    padded_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    ids_1T, labels_1T, packed = unpad(b.input_ids, b.attention_mask, b.labels)
    out = model(ids_1T, labels=labels_1T, packed=packed)
    out.loss.backward()

    assert out.num_masked == padded.num_masked
    torch.testing.assert_close(out.logits, padded.logits, atol=tol.logits_atol, rtol=tol.logits_rtol)
    torch.testing.assert_close(out.loss, padded.loss, atol=tol.loss_atol, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, padded_grads[name], atol=tol.grad_atol, rtol=tol.grad_rtol, msg=name)


def test_packed_batches_work_with_activation_checkpointing(random_model, padded_batch, tol):
    b = padded_batch
    ids_1T, labels_1T, packed = unpad(b.input_ids, b.attention_mask, b.labels)
    model = random_model.train()
    plain = model(ids_1T, labels=labels_1T, packed=packed).loss
    model.set_gradient_checkpointing(True)
    recomputed = model(ids_1T, labels=labels_1T, packed=packed).loss
    recomputed.backward()
    torch.testing.assert_close(recomputed, plain, atol=tol.loss_atol, rtol=0)


def test_a_packed_row_must_hold_exactly_the_described_tokens(random_model):
    packed = PackedSequences.from_lengths([3, 2])
    with pytest.raises(ValueError, match=r"one row of sum\(lengths\) = 5 tokens"):
        random_model(torch.ones(1, 6, dtype=torch.long), packed=packed)
    too_long = PackedSequences.from_lengths([17])
    with pytest.raises(ValueError, match="exceed max_position_embeddings=16"):
        random_model(torch.ones(1, 17, dtype=torch.long), packed=too_long)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="requires_gpu: needs a CUDA device")
def test_flash_varlen_packed_attention_matches_padded_sdpa_on_cuda(random_model, padded_batch, monkeypatch):
    from geneformer_workflow.model import layers

    model = random_model.cuda().train()
    b = padded_batch
    ids, mask, labels = (t.cuda() for t in (b.input_ids, b.attention_mask, b.labels))
    ids_1T, labels_1T, packed = unpad(ids, mask, labels)

    def step(**kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**kwargs)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_loss, padded_grads = step(input_ids=ids, attention_mask=mask, labels=labels)
    varlen_loss, varlen_grads = step(input_ids=ids_1T, labels=labels_1T, packed=packed)
    monkeypatch.setattr(layers, "_flash_varlen", lambda: None)  # the per-cell SDPA path, for comparison
    loop_loss, _ = step(input_ids=ids_1T, labels=labels_1T, packed=packed)
    # bf16: compare within bf16 rounding (relative), gradients by their relative error norm per parameter.
    torch.testing.assert_close(varlen_loss, padded_loss, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(varlen_loss, loop_loss, atol=1e-2, rtol=1e-2)
    for name, grad in varlen_grads.items():
        if name.endswith("attention.self.key.bias"):
            continue  # its true gradient is 0 (softmax ignores a per-query constant): both sides are rounding noise
        reference = padded_grads[name].float()
        error = (grad.float() - reference).norm() / reference.norm().clamp_min(1e-6)
        assert error < 5e-2, f"{name}: relative gradient error {error:.3g}"
