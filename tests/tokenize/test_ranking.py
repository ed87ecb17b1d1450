from __future__ import annotations

import numpy as np
import pytest
from geneformer_workflow import _ranking
from geneformer_workflow._ranking import rank_rows
from hypothesis import given, settings
from hypothesis import strategies as st


def naive(indptr, columns, counts, inv_n, inv_median, token, max_genes):
    """A stable per-row sort by (value desc, token asc), written the obvious way."""
    out, lengths = [], []
    for r in range(indptr.size - 1):
        sel = slice(indptr[r], indptr[r + 1])
        cols = columns[sel]
        values = ((counts[sel].astype(np.float64) * inv_n[r]) * 10_000.0) * inv_median[cols]
        ranked = sorted(zip(values.tolist(), token[cols].tolist(), strict=True), key=lambda vt: (-vt[0], vt[1]))
        out += [t for _, t in ranked[:max_genes]]
        lengths.append(min(len(ranked), max_genes))
    return np.array(out, dtype=np.int32), np.array(lengths, dtype=np.int32)


def random_rows(rng, n_rows, n_columns, per_row, inv_median_choices=None):
    indptr, columns = [0], []
    for _ in range(n_rows):
        n = int(rng.integers(0, per_row + 1))
        columns.append(np.sort(rng.choice(n_columns, size=min(n, n_columns), replace=False)))
        indptr.append(indptr[-1] + columns[-1].size)
    columns = np.concatenate(columns).astype(np.int32)
    counts = rng.integers(1, 6, columns.size).astype(np.float32)
    inv_n = 1.0 / rng.integers(500, 5000, n_rows).astype(np.float64)
    if inv_median_choices is None:
        inv_median = 1.0 / rng.uniform(0.1, 10.0, n_columns)
    else:
        inv_median = rng.choice(inv_median_choices, n_columns)
    token = (rng.permutation(n_columns) + 2).astype(np.int32)  # token order differs from column order
    return np.array(indptr, dtype=np.int64), columns, counts, inv_n, inv_median, token


TIES = {
    "none": None,
    "exact": np.array([1.0, 2.0, 0.5]),  # equal counts and medians: exactly equal values
    "near": np.array([1.0, np.nextafter(1.0, 2.0), 1.0 + 1e-12, 1.0 + 1e-9, 2.0]),  # closer than the key keeps
}


@pytest.mark.parametrize("ties", list(TIES))
@pytest.mark.parametrize("n_columns", [7, 25_426, 60_000, 3_000_000])
@pytest.mark.parametrize("max_genes", [3, 2048])
def test_matches_a_stable_per_row_sort(ties, n_columns, max_genes):
    rng = np.random.default_rng(n_columns)
    args = random_rows(rng, 300, n_columns, 60, TIES[ties])
    got = rank_rows(*args, max_genes)
    want = naive(*args, max_genes)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_blocks_and_runs_across_row_boundaries(monkeypatch):
    # Tiny blocks; every row holds the same values, so the last entry of a row equals the first of the next.
    monkeypatch.setattr(_ranking, "BLOCK_ENTRIES", 5)
    n_rows, n_columns = 40, 12
    indptr = np.arange(0, (n_rows + 1) * 3, 3, dtype=np.int64)
    columns = np.tile(np.array([2, 5, 9], dtype=np.int32), n_rows)
    counts = np.tile(np.array([1, 3, 1], dtype=np.int64), n_rows)
    inv_n = np.full(n_rows, 0.25)
    inv_median = np.ones(n_columns)
    token = np.arange(n_columns, 0, -1).astype(np.int32)  # descending: ties go to the higher column
    got = rank_rows(indptr, columns, counts, inv_n, inv_median, token, 2048)
    assert np.array_equal(got[0], naive(indptr, columns, counts, inv_n, inv_median, token, 2048)[0])
    assert got[0][:3].tolist() == [token[5], token[9], token[2]]


def test_empty_input_and_empty_rows():
    indptr = np.array([0, 0, 2, 2], dtype=np.int64)
    columns, counts = np.array([0, 1], dtype=np.int32), np.array([1.0, 2.0])
    tokens, lengths = rank_rows(indptr, columns, counts, np.ones(3), np.ones(2), np.array([5, 6], np.int32), 10)
    assert tokens.tolist() == [6, 5] and lengths.tolist() == [0, 2, 0]
    empty = rank_rows(np.zeros(1, np.int64), columns[:0], counts[:0], np.ones(0), np.ones(2), np.array([5, 6]), 10)
    assert empty[0].size == 0 and empty[1].size == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 49), st.integers(1, 4), st.sampled_from([0.5, 1.0, 1 + 1e-10, 3.0, 1e-3, 7e3])),
            max_size=20,
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 25),
)
def test_property_equal_to_naive_on_arbitrary_cells(cells, max_genes):
    indptr, columns, counts, inv_median = [0], [], [], np.ones(50)
    for cell in cells:
        unique = {c: (x, m) for c, x, m in cell}  # one entry per column within a cell
        for c in sorted(unique):
            columns.append(c)
            counts.append(unique[c][0])
            inv_median[c] = unique[c][1]  # the last draw wins: columns share medians across cells
        indptr.append(len(columns))
    args = (
        np.array(indptr, dtype=np.int64),
        np.array(columns, dtype=np.int32),
        np.array(counts, dtype=np.int32),
        np.full(len(cells), 1 / 3),
        inv_median,
        (np.arange(50)[::-1] * 7 % 50).astype(np.int32),
    )
    got, want = rank_rows(*args, max_genes), naive(*args, max_genes)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
