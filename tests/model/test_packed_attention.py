"""``ModelConfig.packed_attention``: every kernel for packed batches gives the same attention (CPU, float64 / fp32),
and :func:`jagged_attention` (one SDPA call on nested tensors; the ``jagged`` kernel on CUDA, run here through
PyTorch's CPU math path: the same views, offsets and dropout call) applies attention dropout within each cell."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from geneformer_workflow.model import (
    GeneformerForMaskedLM,
    ModelConfig,
    PackedSequences,
    compile_encoder_layers,
    unpad,
)
from geneformer_workflow.model.layers import jagged_attention, packed_attention

KERNELS = ("auto", "per_cell", "jagged")


def packed_qkv(lengths: list[int], *, heads: int = 3, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shape = (1, sum(lengths), heads, dim)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))


def per_cell_reference(q, k, v, lengths: list[int]) -> torch.Tensor:
    """Softmax attention written out per cell (no SDPA), the definition every kernel must meet."""
    outputs = []
    for q_1LND, k_1LND, v_1LND in zip(*(x.split(lengths, 1) for x in (q, k, v)), strict=True):
        scores_NLL = torch.einsum("lnd,mnd->nlm", q_1LND[0], k_1LND[0]) / q.shape[-1] ** 0.5
        outputs.append(torch.einsum("nlm,mnd->lnd", scores_NLL.softmax(-1), v_1LND[0]))
    return torch.cat(outputs, 0).unsqueeze(0)


@pytest.mark.parametrize("kernel", [*KERNELS, "jagged_attention"])
@pytest.mark.parametrize("lengths", [[5, 1, 9, 3], [1], [16, 16]])
def test_every_kernel_computes_block_diagonal_attention(kernel, lengths):
    q, k, v = packed_qkv(lengths)
    packed = PackedSequences.from_lengths(lengths)
    if kernel == "jagged_attention":  # the nested-tensor call itself (what ``jagged`` runs on CUDA)
        out = jagged_attention(q, k, v, packed, 0.0)
    else:
        out = packed_attention(q, k, v, packed, 0.0, kernel)
    expected = per_cell_reference(q, k, v, lengths)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * expected).sum(), (q, k, v))
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-12, rtol=0)


def test_jagged_dropout_drops_and_rescales_within_each_cell():
    """With dropout the output is a random mixture of each cell's own values, unbiased (mean over draws)."""
    lengths = [6, 2, 9]
    q, k, v = (x.detach() for x in packed_qkv(lengths))
    v = torch.zeros_like(v)
    v[0, 6:8] = 1.0  # only the second cell's values are non-zero: attention may not leak them into other cells
    packed = PackedSequences.from_lengths(lengths)
    torch.manual_seed(0)
    draws = torch.stack([jagged_attention(q, k, v, packed, 0.5) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])  # dropout is applied
    assert draws[:, :, :6].abs().max() == 0 and draws[:, :, 8:].abs().max() == 0  # no leak across cells
    second_cell = draws[:, :, 6:8]
    # the kept probabilities (summing to at most 1) are scaled by 1 / (1 - p) = 2; some draws drop them all
    assert second_cell.min() == 0.0 and second_cell.max() <= 2.0 + 1e-12
    assert second_cell.mean().item() == pytest.approx(1.0, abs=0.05)  # unbiased: E[output] = the undropped 1.0


def test_jagged_dropout_is_reproducible_from_the_seed():
    lengths = [4, 7]
    q, k, v = (x.detach() for x in packed_qkv(lengths))
    packed = PackedSequences.from_lengths(lengths)
    torch.manual_seed(3)
    first = jagged_attention(q, k, v, packed, 0.3)
    torch.manual_seed(3)
    assert torch.equal(jagged_attention(q, k, v, packed, 0.3), first)


@pytest.mark.parametrize("kernel", ["per_cell", "jagged"])
def test_a_model_with_each_kernel_has_the_padded_loss_and_gradients(tiny_cfg, padded_batch, tol, kernel):
    torch.manual_seed(0)
    padded_model = GeneformerForMaskedLM(tiny_cfg).train()  # dropout is 0 in tiny_cfg
    model = GeneformerForMaskedLM(dataclasses.replace(tiny_cfg, packed_attention=kernel)).train()
    model.load_state_dict(padded_model.state_dict())
    assert all(layer.attention.self.core.packed_kernel == kernel for layer in model.encoder_layers)

    b = padded_batch
    padded = padded_model(b.input_ids, b.attention_mask, labels=b.labels)
    padded.loss.backward()
    ids_1T, labels_1T, packed = unpad(b.input_ids, b.attention_mask, b.labels)
    out = model(ids_1T, labels=labels_1T, packed=packed)
    out.loss.backward()
    torch.testing.assert_close(out.loss, padded.loss, atol=tol.loss_atol, rtol=0)
    reference = dict(padded_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name].grad, atol=tol.grad_atol, rtol=tol.grad_rtol, msg=name)


def checkpointed_and_plain(model, batch, device: str) -> tuple[tuple[torch.Tensor, list[torch.Tensor]], ...]:
    """(loss, gradients) of one seeded training step with and without activation checkpointing."""
    ids, mask, labels = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels))
    ids_1T, labels_1T, packed = unpad(ids, mask, labels)

    def step(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.set_gradient_checkpointing(checkpointing)
        torch.manual_seed(7)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(ids_1T, labels=labels_1T, packed=packed).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    return step(False), step(True)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="requires_gpu: needs a CUDA device"),
            ],
        ),
    ],
)
def test_jagged_dropout_is_recomputed_identically_under_activation_checkpointing(tiny_cfg, padded_batch, device):
    """On CUDA the nested-tensor flash / efficient kernel with its dropout; on CPU the per-cell path it falls back to.
    Checkpointing restores the RNG state, so the recomputed dropout masks, loss and gradients are the same."""
    cfg = dataclasses.replace(tiny_cfg, packed_attention="jagged", attention_probs_dropout_prob=0.3)
    model = GeneformerForMaskedLM(cfg).to(device).train()
    plain, recomputed = checkpointed_and_plain(model, padded_batch, device)
    (plain_loss, plain_grads), (recomputed_loss, recomputed_grads) = plain, recomputed
    assert torch.equal(recomputed_loss, plain_loss)
    for grad, reference in zip(recomputed_grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["per_cell", "jagged"])
def test_a_model_with_a_chosen_kernel_can_be_compiled(tiny_cfg, padded_batch, tol, kernel):
    torch.manual_seed(0)
    eager = GeneformerForMaskedLM(dataclasses.replace(tiny_cfg, packed_attention=kernel)).eval()
    compiled = GeneformerForMaskedLM(dataclasses.replace(tiny_cfg, packed_attention=kernel)).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_encoder_layers(compiled, backend="eager")  # Dynamo traces the layers; packed attention stays eager
    ids_1T, labels_1T, packed = unpad(padded_batch.input_ids, padded_batch.attention_mask, padded_batch.labels)
    with torch.no_grad():
        expected = eager(ids_1T, labels=labels_1T, packed=packed).loss
        torch.testing.assert_close(compiled(ids_1T, labels=labels_1T, packed=packed).loss, expected, atol=0, rtol=0)


def test_an_unknown_kernel_is_refused_and_the_choice_is_not_exported(tiny_cfg):
    with pytest.raises(ValueError, match=r"packed_attention must be one of \('auto', 'per_cell', 'jagged'\)"):
        dataclasses.replace(tiny_cfg, packed_attention="flash")
    hf_config = dataclasses.replace(tiny_cfg, packed_attention="jagged").to_hf_config()
    assert "packed_attention" not in hf_config.to_dict()
    assert ModelConfig.from_hf_config(hf_config).packed_attention == "auto"
