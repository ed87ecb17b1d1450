"""Property-based invariants of the tokenizer (hypothesis), on small random count matrices."""

from __future__ import annotations

import tempfile
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from geneformer_workflow.presets import Preset
from geneformer_workflow.testing import write_counts_h5ad
from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad
from geneformer_workflow.tokenize.vocab import build_token_dictionary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

N_GENES = 12
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

counts_matrices = arrays(np.int32, st.tuples(st.integers(1, 6), st.just(N_GENES)), elements=st.integers(0, 9))
medians_lists = st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0, 7.0]), min_size=N_GENES, max_size=N_GENES)
presets = st.sampled_from([Preset("short_v1", 5, special_tokens=False), Preset("short_v2", 6, special_tokens=True)])


def tokenize(counts: np.ndarray, medians: list[float], preset: Preset, genes: list[str] = GENES) -> list[dict]:
    tokens = build_token_dictionary(GENES, preset)
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = write_counts_h5ad(Path(tmp) / "in.h5ad", counts, genes)
        out = Path(tmp) / "c.parquet"
        keep = counts.sum(1) > 0
        if not keep.any():
            return []
        tokenize_h5ad(
            h5ad,
            out,
            token_dictionary=tokens,
            gene_medians=pd.Series(medians, index=GENES),
            preset=preset,
            validation_fraction=0,
        )
        return pq.read_table(out).to_pylist()


@SETTINGS
@given(counts_matrices, medians_lists, presets)
def test_tokens_unique_ordered_bounded_with_specials_in_place(counts, medians, preset):
    tokens = build_token_dictionary(GENES, preset)
    gene_of = {tokens[g]: j for j, g in enumerate(GENES)}
    rows = tokenize(counts, medians, preset)
    kept = [i for i in range(counts.shape[0]) if counts[i].sum() > 0]
    assert [r["cell_id"] for r in rows] == [f"cell{i}" for i in kept]
    for row, i in zip(rows, kept, strict=True):
        ids = row["input_ids"]
        assert len(ids) == row["length"] <= preset.max_length
        if preset.special_tokens:
            assert ids[0] == tokens["<cls>"] and ids[-1] == tokens["<eos>"]
            ids = ids[1:-1]
        assert len(set(ids)) == len(ids)
        assert len(ids) == min(int((counts[i] > 0).sum()), preset.max_genes)
        # the documented value, with upstream's float64 order of operations
        inv_n = 1.0 / float(counts[i].sum())
        values = [((float(counts[i, gene_of[t]]) * inv_n) * 10_000.0) * (1.0 / medians[gene_of[t]]) for t in ids]
        assert all(a >= b for a, b in pairwise(values))
        for a, b, va, vb in zip(ids, ids[1:], values, values[1:], strict=False):
            assert va > vb or a < b  # exact ties: ascending token id


@SETTINGS
@given(counts_matrices, medians_lists, presets, st.randoms(use_true_random=False))
def test_gene_column_order_changes_nothing(counts, medians, preset, random):
    order = list(range(N_GENES))
    random.shuffle(order)
    assert tokenize(counts[:, order], medians, preset, [GENES[j] for j in order]) == tokenize(counts, medians, preset)


@SETTINGS
@given(counts_matrices, medians_lists, presets, st.sampled_from([2, 4, 64]))
def test_scaling_a_cells_counts_changes_nothing(counts, medians, preset, factor):
    # Powers of two scale float64 exactly; other factors can only flip values equal to within rounding.
    assert tokenize(counts * factor, medians, preset) == tokenize(counts, medians, preset)
