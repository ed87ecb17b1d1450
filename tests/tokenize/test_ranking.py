from __future__ import annotations

import numpy as np
import pytest
from geneformer_workflow.tokenize import _ranking
from geneformer_workflow.tokenize._ranking import rank_rows
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


def misordered_pairs(n: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Pairs ``(count, inv_median)`` in one row whose factored order (``count * inv_median``) is not upstream's.

    Returns, per pair: ``inv_n``, both counts, both inv_medians, and the gap of their factored key buckets
    (``bits >> MIN_COLUMN_BITS``); upstream either reverses the pair or ties it.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 8, n)
    c = rng.integers(1, 30, (2, n)).astype(np.float64)
    m = x / c
    m[1] += rng.integers(-3, 4, n) * np.spacing(m[1])
    inv_n = 1.0 / rng.integers(300, 60_000, n)
    w = c * m
    v = ((c * inv_n) * 10_000.0) * m
    wrong = (np.sign(w[0] - w[1]) != np.sign(v[0] - v[1])) & (w[0] != w[1])
    bucket = (w.view(np.uint64) >> np.uint64(_ranking.MIN_COLUMN_BITS)).astype(np.int64)
    gap = np.abs(bucket[0] - bucket[1])
    return inv_n[wrong], c[:, wrong], m[:, wrong], gap[wrong]


def test_values_misordered_by_the_factored_key_across_a_bucket_boundary():
    # 16 columns: the key keeps MIN_COLUMN_BITS column bits, the narrowest buckets, so some pairs whose
    # factored order is wrong (or tied upstream) land in adjacent buckets: the runs must span them.
    inv_n, c, m, gap = misordered_pairs(400_000)
    assert gap.max() <= 1
    pick = np.flatnonzero(gap == 1)
    assert pick.size >= 16
    for group in np.array_split(pick[:64], 8):  # 8 rows of 2 entries, 16 columns each call
        rows = group.size
        indptr = np.arange(0, 2 * rows + 1, 2, dtype=np.int64)
        columns = np.arange(2 * rows, dtype=np.int32)
        counts = c[:, group].T.ravel()
        inv_median = m[:, group].T.ravel()
        for token in (np.arange(2 * rows, dtype=np.int32), np.arange(2 * rows, dtype=np.int32)[::-1].copy()):
            args = (indptr, columns, counts, inv_n[group], inv_median, token)
            got, want = rank_rows(*args, 2048), naive(*args, 2048)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


BOUNDARY = 1.0  # low mantissa bits zero: a key-bucket boundary for any number of column bits


@st.composite
def near_tie_cells(draw):
    """Cells whose values cluster within a few ulps of a key-bucket boundary (count * inv_median ~ BOUNDARY)."""
    n_columns = draw(st.sampled_from([5, 16, 40]))
    scale = [1.0 / d for d in range(1, 8)]
    inv_median = np.array(
        [
            draw(st.sampled_from(scale)) * BOUNDARY + draw(st.integers(-40, 40)) * np.spacing(BOUNDARY) / 8
            for _ in range(n_columns)
        ]
    )
    cells = draw(st.lists(st.lists(st.integers(0, n_columns - 1), unique=True, max_size=n_columns), max_size=10))
    indptr, columns, counts = [0], [], []
    for cell in cells:
        for col in sorted(cell):
            columns.append(col)
            near = round(1.0 / inv_median[col])  # count * inv_median ~ BOUNDARY
            counts.append(draw(st.sampled_from([near, near, near, 1, 2, 3])))
        indptr.append(len(columns))
    inv_n = np.array([draw(st.sampled_from([1 / 3, 1 / 7, 1 / 2047, 5.2194790959862204e-05])) for _ in cells])
    token = np.array(draw(st.permutations(range(2, n_columns + 2))), dtype=np.int32)
    return (
        np.array(indptr, dtype=np.int64),
        np.array(columns, dtype=np.int32),
        np.array(counts, dtype=np.float32),
        inv_n,
        inv_median,
        token,
    )


@settings(max_examples=150, deadline=None)
@given(near_tie_cells(), st.integers(1, 12), st.sampled_from([3, 7, 32_768]), st.sampled_from([0, 48, 10**9]))
def test_property_near_ties_at_bucket_boundaries(args, max_genes, block, few_pairs):
    # Small blocks put rows longer than a block and runs at block edges; few_pairs picks either run grouping.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_ranking, "BLOCK_ENTRIES", block)
        mp.setattr(_ranking, "FEW_PAIRS", few_pairs)
        got = rank_rows(*args, max_genes)
    want = naive(*args, max_genes)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("few_pairs", [0, 10**9])
@pytest.mark.parametrize("ties", ["exact", "near"])
def test_both_run_groupings(monkeypatch, few_pairs, ties):
    monkeypatch.setattr(_ranking, "FEW_PAIRS", few_pairs)
    monkeypatch.setattr(_ranking, "BLOCK_ENTRIES", 500)
    args = random_rows(np.random.default_rng(7), 200, 60, 60, TIES[ties])
    got, want = rank_rows(*args, 30), naive(*args, 30)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=8), st.data())
def test_few_and_many_runs_agree(row_sizes, data):
    starts = np.concatenate(([0], np.cumsum(row_sizes))).astype(np.int64)
    n = int(starts[-1])
    near = np.array(sorted(data.draw(st.sets(st.integers(0, max(n - 2, 0)), max_size=max(n - 1, 0)))), np.int64)
    kept = [p for p in near.tolist() if np.searchsorted(starts, p, "right") == np.searchsorted(starts, p + 1, "right")]
    position = sorted({q for p in kept for q in (p, p + 1)})
    run = np.cumsum([q - 1 not in kept for q in position]) - 1
    row = np.searchsorted(starts, position, "right") - 1
    for got in (_ranking._few_runs(near, starts), _ranking._many_runs(near, starts)):
        assert [x.tolist() for x in got] == [position, run.tolist(), row.tolist()]


UNFACTORABLE = {
    "row scale 0": dict(inv_n=0.0),  # every value 0: ties by token
    "tiny row scale": dict(inv_n=1e-310),
    "huge inv_median": dict(inv_median=1e300),  # upstream values overflow to inf
    "tiny inv_median": dict(inv_median=1e-310),
    "float64 counts with 0": dict(counts=0.0),
    "tiny float64 count": dict(counts=1e-310),
}


@pytest.mark.parametrize("block", [60, 32_768])  # 60: the counts' blocks use upstream values, the others not
@pytest.mark.parametrize("case", list(UNFACTORABLE))
def test_inputs_out_of_the_factored_range_use_upstream_values(monkeypatch, case, block):
    monkeypatch.setattr(_ranking, "BLOCK_ENTRIES", block)
    rng = np.random.default_rng(3)
    indptr, columns, counts, inv_n, inv_median, token = random_rows(rng, 40, 30, 20, TIES["exact"])
    counts = counts.astype(np.float64)
    change = UNFACTORABLE[case]
    if "inv_n" in change:
        inv_n[::3] = change["inv_n"]
    if "inv_median" in change:
        inv_median[::4] = change["inv_median"]
    if "counts" in change:
        counts[: indptr[10] : 5] = change["counts"]
    args = (indptr, columns, counts, inv_n, inv_median, token)
    assert not (_ranking._scales_in_range(np.diff(indptr), inv_n, inv_median) and _ranking._counts_in_range(counts))
    got, want = rank_rows(*args, 25), naive(*args, 25)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_zero_counts_and_medians_stay_factored():
    # 0 * anything is 0 in both formulas: zero values tie (by token) below every positive value.
    rng = np.random.default_rng(4)
    indptr, columns, counts, inv_n, inv_median, token = random_rows(rng, 60, 30, 25)
    counts = counts.astype(np.int64)
    counts[::4] = 0
    inv_median[::5] = 0.0
    args = (indptr, columns, counts, inv_n, inv_median, token)
    assert _ranking._scales_in_range(np.diff(indptr), inv_n, inv_median) and _ranking._counts_in_range(counts)
    for max_genes in (4, 2048):
        got, want = rank_rows(*args, max_genes), naive(*args, max_genes)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_column_bits_have_a_floor():
    ranker = _ranking._BlockRanker(*random_rows(np.random.default_rng(0), 2, 2, 2)[1:], True)
    assert ranker.column_bits == _ranking.MIN_COLUMN_BITS >= 3
