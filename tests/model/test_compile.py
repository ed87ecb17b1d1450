"""``model.compile``: each encoder layer compiled in place; same results as eager, a bounded number of graphs for
batches of every shape (padded and packed), activation checkpointing, unchanged state-dict keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from geneformer_workflow.model import (
    TORCH_PRIMITIVES,
    GeneformerForMaskedLM,
    compile_encoder_layers,
    unpad,
)
from torch._dynamo.utils import counters


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty Dynamo caches and counters (compiled code is cached per code object)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    """Graphs Dynamo has compiled since the last reset."""
    return counters["stats"]["unique_graphs"]


def batch(cells: int, tokens: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cells`` right-padded cells of 1..``tokens`` tokens (the first is full), a third of the tokens masked."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (cells,), generator=gen)
    lengths[0] = tokens
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, vocab, (cells, tokens), generator=gen) * mask
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.3) & mask.bool(), ids, -100)
    labels[:, 0] = ids[:, 0]  # every cell has a label
    return ids, mask, labels


def twins(cfg, randomize, backend: str) -> tuple[GeneformerForMaskedLM, GeneformerForMaskedLM]:
    """An eager model and a copy with compiled layers, both in train mode."""
    torch.manual_seed(0)
    eager = GeneformerForMaskedLM(cfg)
    randomize(eager)
    compiled = GeneformerForMaskedLM(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_encoder_layers(compiled, backend=backend)
    return eager.train(), compiled.train()


def loss_and_grads(model, ids, mask, labels, packed: bool):
    model.zero_grad(set_to_none=True)
    if packed:
        ids, labels, seqs = unpad(ids, mask, labels)
        out = model(ids, labels=labels, packed=seqs)
    else:
        out = model(ids, mask, labels=labels)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(eager, compiled, data, *, packed: bool = False, tol: float = 1e-5) -> None:
    out, grads = loss_and_grads(eager, *data, packed)
    out_c, grads_c = loss_and_grads(compiled, *data, packed)
    torch.testing.assert_close(out_c.logits, out.logits, rtol=tol, atol=tol)
    torch.testing.assert_close(out_c.loss, out.loss, rtol=tol, atol=tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=tol, atol=tol, msg=name)


def test_inductor_compiled_layers_match_eager_with_one_graph_for_all_layers(tiny_cfg, randomize):
    eager, compiled = twins(tiny_cfg, randomize, "inductor")
    for seed, (cells, tokens) in enumerate([(3, 12), (2, 9)]):
        assert_same(eager, compiled, batch(cells, tokens, tiny_cfg.vocab_size, seed))
    assert graphs() == 1  # both layers, both shapes: one graph (batch and token dimensions dynamic)


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["three_projections", "fused_qkv"])
def test_many_padded_shapes_compile_a_bounded_number_of_graphs(tiny_cfg, randomize, fused_qkv):
    cfg = dataclasses.replace(tiny_cfg, fused_qkv=fused_qkv)
    eager, compiled = twins(cfg, randomize, "aot_eager")
    shapes = [(3, 12), (2, 5), (4, 16), (2, 7), (3, 11), (5, 14), (2, 3), (4, 9), (2, 16), (3, 6)]
    for seed, shape in enumerate(shapes):
        assert_same(eager, compiled, batch(*shape, cfg.vocab_size, seed))
    assert graphs() == 1
    assert_same(eager, compiled, batch(1, 10, cfg.vocab_size, 99))  # one cell: Dynamo specialises a size of 1
    assert_same(eager, compiled, batch(1, 13, cfg.vocab_size, 98))
    assert graphs() == 2


def test_packed_batches_compile_a_bounded_number_of_graphs(tiny_cfg, randomize):
    eager, compiled = twins(tiny_cfg, randomize, "aot_eager")
    shapes = [(3, 12), (2, 9), (4, 16), (3, 7), (2, 15), (5, 11), (3, 16), (4, 5)]
    for seed, shape in enumerate(shapes[:2]):  # the code around the eager packed attention, then its dynamic version
        assert_same(eager, compiled, batch(*shape, tiny_cfg.vocab_size, seed), packed=True)
    warm = graphs()
    assert 0 < warm <= 12
    for seed, shape in enumerate(shapes[2:], start=2):  # new lengths and numbers of cells: no new graph
        assert_same(eager, compiled, batch(*shape, tiny_cfg.vocab_size, seed), packed=True)
    assert graphs() == warm


def test_compiled_layers_work_with_activation_checkpointing(tiny_cfg, randomize):
    cfg = dataclasses.replace(tiny_cfg, gradient_checkpointing=True)
    eager, compiled = twins(cfg, randomize, "aot_eager")
    for seed, shape in enumerate([(3, 12), (2, 9), (4, 6)]):
        assert_same(eager, compiled, batch(*shape, cfg.vocab_size, seed))
        assert_same(eager, compiled, batch(*shape, cfg.vocab_size, seed), packed=True)


def test_compiling_keeps_state_dict_keys_and_layer_types(tiny_cfg):
    model = GeneformerForMaskedLM(tiny_cfg)
    keys = list(model.state_dict())
    compile_encoder_layers(model, backend="eager")
    assert list(model.state_dict()) == keys  # in place: no `_orig_mod.` segment in checkpoints or exports
    assert all(type(layer).__name__ == "BertLayer" for layer in model.encoder_layers)


def test_layers_other_than_pytorch_ones_are_refused_with_the_key_to_change(tiny_cfg):
    # other Linear / LayerNorm factories, e.g. Transformer Engine's (the attention kernel alone may differ)
    other = dataclasses.replace(TORCH_PRIMITIVES, linear=lambda n_in, n_out: torch.nn.Linear(n_in, n_out))
    model = GeneformerForMaskedLM(tiny_cfg, other)
    with pytest.raises(ValueError, match=r"Transformer Engine layers are left out.*set model.compile=false"):
        compile_encoder_layers(model)
