"""Masking follows Geneformer's MLM rules and is keyed per cell."""

from __future__ import annotations

import re

import numpy as np
import pytest
from geneformer_workflow.train.collate import Collator
from geneformer_workflow.train.masking import IGNORE_INDEX, MaskingConfig, cell_rng, mask_tokens
from geneformer_workflow.train.vocab import load_vocab

from .conftest import write_vocab

PAD, MASK, CLS, EOS = 0, 1, 2, 3


@pytest.fixture(scope="module")
def v2_vocab(tmp_path_factory):
    return load_vocab(write_vocab(tmp_path_factory.mktemp("v2"), n_genes=500, v2=True))


def v2_cell(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.concatenate([[CLS], rng.choice(np.arange(4, 504), n, replace=False), [EOS]])


def test_vocab_reads_special_ids_and_gene_pool(v2_vocab):
    assert (v2_vocab.pad_id, v2_vocab.mask_id, v2_vocab.cls_id, v2_vocab.eos_id) == (PAD, MASK, CLS, EOS)
    assert v2_vocab.size == 504
    assert v2_vocab.gene_ids[0] == 4 and v2_vocab.gene_ids.shape == (500,)


def test_specials_and_padding_are_never_masked(v2_vocab):
    cfg = MaskingConfig.from_vocab(v2_vocab, mlm_probability=0.9)
    rng = np.random.default_rng(0)
    for seed in range(50):
        ids = np.concatenate([v2_cell(rng, 100), [PAD] * 5])
        inputs, labels = mask_tokens(ids, cell_rng(0, 0, 0, seed), cfg)
        special = np.isin(ids, [PAD, MASK, CLS, EOS])
        assert (labels[special] == IGNORE_INDEX).all()
        assert (inputs[special] == ids[special]).all()
        assert (labels[~special] != IGNORE_INDEX).any()


def test_masking_rate_and_80_10_10_split_on_a_large_sample(v2_vocab):
    cfg = MaskingConfig.from_vocab(v2_vocab, mlm_probability=0.15)
    rng = np.random.default_rng(1)
    selected = to_mask = to_random = unchanged = maskable = 0
    for cell in range(400):
        ids = v2_cell(rng, 498)
        inputs, labels = mask_tokens(ids, cell_rng(7, 0, 0, cell), cfg)
        chosen = labels != IGNORE_INDEX
        maskable += len(ids) - 2
        selected += chosen.sum()
        to_mask += (inputs[chosen] == MASK).sum()
        unchanged += (inputs[chosen] == ids[chosen]).sum()
        to_random += ((inputs[chosen] != MASK) & (inputs[chosen] != ids[chosen])).sum()
        assert np.isin(inputs[chosen & (inputs != MASK)], v2_vocab.gene_ids).all()  # replacements are genes
    assert selected / maskable == pytest.approx(0.15, abs=0.005)  # n ≈ 199k: sd ≈ 0.0008
    assert to_mask / selected == pytest.approx(0.8, abs=0.01)
    # A random replacement can draw the original gene (1/500), which then counts as unchanged.
    assert to_random / selected == pytest.approx(0.1 * 499 / 500, abs=0.01)
    assert unchanged / selected == pytest.approx(0.1 + 0.1 / 500, abs=0.01)


def test_mask_depends_only_on_seed_epoch_and_cell(v2_vocab):
    cfg = MaskingConfig.from_vocab(v2_vocab, mlm_probability=0.15)
    ids = v2_cell(np.random.default_rng(2), 200)
    a = mask_tokens(ids, cell_rng(1, 0, 3, 42), cfg)
    b = mask_tokens(ids, cell_rng(1, 0, 3, 42), cfg)
    c = mask_tokens(ids, cell_rng(1, 0, 4, 42), cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])  # a new epoch gives the cell a new mask


def test_collator_mask_is_independent_of_batch_composition(v2_vocab):
    cfg = MaskingConfig.from_vocab(v2_vocab, mlm_probability=0.15)
    collate = Collator(cfg, pad_id=PAD, eos_id=EOS, max_length=64, pad_to_multiple_of=8, seed=0)
    rng = np.random.default_rng(3)
    cells = [v2_cell(rng, n) for n in (30, 50, 10)]
    together = collate(cells, np.array([5, 6, 7]), stream=0, epoch=0)
    alone = collate(cells[1:2], np.array([6]), stream=0, epoch=0)
    n = len(cells[1])
    assert np.array_equal(together.labels[1, :n], alone.labels[0, :n])
    assert np.array_equal(together.input_ids[1, :n], alone.input_ids[0, :n])
    assert together.input_ids.shape == (3, 56)  # longest cell 52 tokens, padded to a multiple of 8
    assert together.n_tokens == 32 + 52 + 12
    assert (together.input_ids[2, 12:] == PAD).all() and (together.attention_mask[2, 12:] == 0).all()


def test_truncation_keeps_top_genes_and_the_final_eos(v2_vocab):
    cfg = MaskingConfig.from_vocab(v2_vocab, mlm_probability=0.15)
    collate = Collator(cfg, pad_id=PAD, eos_id=EOS, max_length=10, pad_to_multiple_of=1, seed=0)
    cell = v2_cell(np.random.default_rng(4), 20)
    kept = collate.truncate(cell)
    assert kept.tolist() == [*cell[:9].tolist(), EOS]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"mlm_probability": 0.0}, "data.mlm_probability"), ({"mask_replace_prob": 0.95}, "data.random_replace_prob")],
    ids=["zero-probability", "probabilities-above-one"],
)
def test_bad_masking_probabilities_name_the_key(v2_vocab, kwargs, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        MaskingConfig.from_vocab(v2_vocab, **{"mlm_probability": 0.15, **kwargs})
