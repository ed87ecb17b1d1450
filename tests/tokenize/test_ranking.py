from __future__ import annotations

import numpy as np
import pytest
from geneformer_workflow._ranking import key_layout, rank_block
from hypothesis import given, settings
from hypothesis import strategies as st


def rank_entries(row, gene, value, n_rows, n_genes):
    gene_bits, max_rows = key_layout(n_genes)
    assert n_rows <= max_rows
    return rank_block(row, gene, value, gene_bits)


def naive(row, gene, value, n_rows):
    out = []
    for r in range(n_rows):
        sel = np.flatnonzero(row == r)
        sel = sel[np.argsort(gene[sel], kind="stable")]
        out.extend(gene[sel][np.argsort(-value[sel], kind="stable")])
    return np.array(out, dtype=np.int64)


def random_entries(rng, n_rows, n_genes, per_row, tie_values):
    rows, genes, values = [], [], []
    for r in range(n_rows):
        g = rng.choice(n_genes, size=min(per_row, n_genes), replace=False)
        v = rng.choice(tie_values, size=g.size) if tie_values is not None else rng.random(g.size) * 100
        rows.append(np.full(g.size, r))
        genes.append(g)
        values.append(v)
    return np.concatenate(rows), np.concatenate(genes), np.concatenate(values).astype(np.float64)


@pytest.mark.parametrize("ties", ["none", "exact", "near"])
@pytest.mark.parametrize("n_genes", [7, 25_426, 60_000])
def test_matches_a_stable_per_row_argsort(ties, n_genes):
    rng = np.random.default_rng(n_genes)
    tie_values = {
        "none": None,
        "exact": np.array([1.0, 2.0, 3.5]),
        "near": np.array([1.0, np.nextafter(1.0, 2.0), 1.0 + 1e-9, 2.0]),
    }[ties]
    row, gene, value = random_entries(rng, 300, n_genes, 40, tie_values)
    assert np.array_equal(rank_entries(row, gene, value, 300, n_genes), naive(row, gene, value, 300))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 49), st.sampled_from([0.5, 1.0, 1.0000000001, 3.0, 1e-3, 7e3])), max_size=20
        ),
        min_size=1,
        max_size=8,
    )
)
def test_property_equal_to_naive_on_arbitrary_cells(cells):
    rows, genes, values = [], [], []
    for r, cell in enumerate(cells):
        unique = dict(cell)  # one value per gene within a cell
        rows += [r] * len(unique)
        genes += list(unique)
        values += list(unique.values())
    row, gene, value = np.array(rows, dtype=np.int64), np.array(genes, dtype=np.int64), np.array(values)
    assert np.array_equal(rank_entries(row, gene, value, len(cells), 50), naive(row, gene, value, len(cells)))
