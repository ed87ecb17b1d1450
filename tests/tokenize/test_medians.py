from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad
from geneformer_workflow.tokenize.h5ad import InputError
from geneformer_workflow.tokenize.medians import (
    BIN_RATIO,
    MAX_EXACT,
    N_BINS,
    ExpressionSummary,
    merge_summaries,
    read_medians,
    summarize_h5ad,
    write_medians_tsv,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from .cases import COUNTS, GENES, run_gfw

DEMO = Path(__file__).resolve().parents[2] / "resources/demo/pbmc_5k_protein_v3.h5ad"


def normalised(counts: np.ndarray, n_counts: np.ndarray) -> np.ndarray:
    """``count / n_counts * 10,000`` in float64, in the order of operations of ``summarize_h5ad``."""
    return np.asarray(counts, dtype=np.float64) / np.asarray(n_counts, dtype=np.float64)[:, None] * 10_000


def exact_nonzero_medians(counts: np.ndarray, genes: list[str], n_counts: np.ndarray) -> pd.Series:
    values = normalised(counts, n_counts)
    return pd.Series(
        {g: np.median(values[counts[:, j] > 0, j]) for j, g in enumerate(genes) if (counts[:, j] > 0).any()}
    )


def summary_of(counts: np.ndarray, genes: list[str], *, max_exact: int, n_counts: np.ndarray | None = None):
    """The summary of dense ``counts`` (cells x genes) without an h5ad file."""
    n_counts = counts.sum(1) if n_counts is None else n_counts
    rows, cols = np.nonzero(counts)
    values = normalised(counts, n_counts)[rows, cols]
    return ExpressionSummary.from_values(
        np.array(genes, dtype=object), cols, values, n_cells=counts.shape[0], max_exact=max_exact
    )


def assert_same_summary(a: ExpressionSummary, b: ExpressionSummary) -> None:
    assert a.gene_ids.tolist() == b.gene_ids.tolist()
    assert (a.n_cells, a.max_exact) == (b.n_cells, b.max_exact)
    np.testing.assert_array_equal(a.n_detected, b.n_detected)
    assert a.exact_values.tobytes() == b.exact_values.tobytes()  # bit-identical, not just close
    assert a.histogram.shape == b.histogram.shape == (len(a.gene_ids), N_BINS)
    assert (a.histogram != b.histogram).nnz == 0


def test_medians_of_hand_checked_cells_are_exact(tmp_path):
    # G1 is detected in 2 cells: an even count, whose median is the mean of the two values (numpy, Geneformer).
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    table = summarize_h5ad(h5ad).medians().set_index("ensembl_id")
    assert table.index.tolist() == GENES
    assert table.loc[GENES[0], "median"] == 0.5 * (4 / 9 * 10_000 + 1 / 6 * 10_000)
    np.testing.assert_array_equal(table["median"], exact_nonzero_medians(COUNTS, GENES, COUNTS.sum(1))[GENES])
    assert table["n_cells_detected"].tolist() == [2, 1, 2, 2]


def test_medians_below_the_bound_equal_numpys_median_bit_for_bit(tmp_path):
    counts = synthetic_counts(600, 300, genes_per_cell=80, seed=1).toarray()
    genes = [f"ENSG{i:011d}" for i in range(300)]
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, genes)
    table = summarize_h5ad(h5ad, chunk_size=128, max_exact=600).medians().set_index("ensembl_id")
    exact = exact_nonzero_medians(counts, genes, counts.sum(1))
    assert table["n_cells_detected"].max() > MAX_EXACT  # the bound is a parameter
    assert (table["n_cells_detected"] % 2 == 0).any() and (table["n_cells_detected"] % 2 == 1).any()
    np.testing.assert_array_equal(table["median"], exact[table.index])


def test_medians_above_the_bound_within_one_bin_of_exact(tmp_path):
    counts = synthetic_counts(600, 300, genes_per_cell=80, seed=1).toarray()
    genes = [f"ENSG{i:011d}" for i in range(300)]
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, genes)
    table = summarize_h5ad(h5ad, chunk_size=128, max_exact=20).medians().set_index("ensembl_id")
    exact = exact_nonzero_medians(counts, genes, counts.sum(1))[table.index]
    above = table["n_cells_detected"] > 20
    assert 20 < above.sum() < len(table) - 20  # both regimes are exercised
    np.testing.assert_array_equal(table["median"][~above], exact[~above])
    rel = (table["median"][above] / exact[above] - 1).abs()
    assert rel.max() < BIN_RATIO - 1
    assert (rel > 0).any()  # really estimated, not exact


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=arrays(np.int64, st.tuples(st.integers(1, 30), st.just(6)), elements=st.sampled_from([0, 0, 0, 1, 2, 7])),
    max_exact=st.integers(0, 8),
    data=st.data(),
)
def test_merged_summary_is_bit_identical_whatever_the_split_and_order(counts, max_exact, data):
    genes = [f"ENSG{i:011d}" for i in range(6)]
    n_counts = counts.sum(1) + 3  # n_counts also counts genes the file lacks
    whole = summary_of(counts, genes, max_exact=max_exact, n_counts=n_counts)
    part_of_cell = data.draw(st.lists(st.integers(0, 3), min_size=len(counts), max_size=len(counts)))
    order = data.draw(st.permutations(range(4)))
    parts = []
    for p in order:
        cells = np.flatnonzero(np.array(part_of_cell) == p)
        if cells.size:  # each part keeps its own gene subset, like files with different genes
            kept = sorted(
                data.draw(st.sets(st.integers(0, 5), min_size=1)) | set(np.flatnonzero(counts[cells].any(0)))
            )
            sub = summary_of(
                counts[np.ix_(cells, kept)], [genes[j] for j in kept], max_exact=max_exact, n_counts=n_counts[cells]
            )
            parts.append(sub)
    folded = merge_summaries(parts)
    # genes no part lists are missing from the merge; a zero-cell summary of all genes adds them back
    all_genes = ExpressionSummary.from_values(np.array(genes, dtype=object), [], [], n_cells=0, max_exact=max_exact)
    assert_same_summary(folded.merge(all_genes), whole)
    if len(parts) > 2:  # another merge tree: (p0 + p1) + (p2 + ...)
        assert_same_summary(parts[0].merge(parts[1]).merge(merge_summaries(parts[2:])), folded)
    table = folded.medians().set_index("ensembl_id")
    exact = exact_nonzero_medians(counts, genes, n_counts)
    assert table.index.tolist() == exact.index.tolist()
    below = table["n_cells_detected"] <= max_exact
    np.testing.assert_array_equal(table["median"][below], exact[below])
    assert ((table["median"][~below] / exact[~below] - 1).abs() < BIN_RATIO - 1).all()


def test_merge_is_independent_of_file_split_and_order(tmp_path):
    counts = synthetic_counts(300, 120, genes_per_cell=40, seed=2).toarray()
    genes = [f"ENSG{i:011d}" for i in range(120)]
    whole = summarize_h5ad(write_counts_h5ad(tmp_path / "all.h5ad", counts, genes), max_exact=60, chunk_size=64)
    assert 0 < (whole.n_detected > 60).sum() < len(genes)
    parts = [
        summarize_h5ad(
            write_counts_h5ad(
                tmp_path / f"p{i}.h5ad", counts[lo:hi], genes, cell_ids=[f"c{j}" for j in range(lo, hi)]
            ),
            max_exact=60,
        )
        for i, (lo, hi) in enumerate([(0, 50), (50, 220), (220, 300)])
    ]
    forward = merge_summaries(parts)
    assert_same_summary(forward, merge_summaries(parts[::-1]))
    assert_same_summary(forward, whole)
    pd.testing.assert_frame_equal(forward.medians(), whole.medians(), check_exact=True)


def test_summaries_with_different_bounds_merge_to_the_smaller_bound():
    counts = synthetic_counts(200, 40, genes_per_cell=15, seed=3).toarray()
    genes = [f"ENSG{i:011d}" for i in range(40)]
    low = summary_of(counts[:80], genes, max_exact=10)
    high = summary_of(counts[80:], genes, max_exact=1000)
    expected = summary_of(counts, genes, max_exact=10)
    assert_same_summary(low.merge(high), expected)
    assert_same_summary(high.merge(low), expected)


def test_merge_unions_gene_sets(tmp_path):
    a = summarize_h5ad(write_counts_h5ad(tmp_path / "a.h5ad", COUNTS[:, :2], GENES[:2]))
    b = summarize_h5ad(write_counts_h5ad(tmp_path / "b.h5ad", COUNTS[:, 2:], GENES[2:]))
    assert merge_summaries([a, b]).medians()["ensembl_id"].tolist() == GENES


def test_empty_summary_merges_to_identity(tmp_path):
    summary = summarize_h5ad(write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES), max_exact=1)
    assert_same_summary(ExpressionSummary.empty().merge(summary), summary)
    assert_same_summary(summary.merge(ExpressionSummary.empty()), summary)


def test_summary_and_table_round_trip(tmp_path):
    counts = synthetic_counts(100, 30, genes_per_cell=12, seed=4).toarray()
    genes = [f"ENSG{i:011d}" for i in range(30)]
    summary = summarize_h5ad(write_counts_h5ad(tmp_path / "in.h5ad", counts, genes), max_exact=30)
    assert summary.exact_values.size and summary.histogram.nnz  # both parts are written and read back
    summary.save(tmp_path / "s.npz")
    assert_same_summary(ExpressionSummary.load(tmp_path / "s.npz"), summary)
    write_medians_tsv(summary.medians(), tmp_path / "m.tsv")
    medians = read_medians(tmp_path / "m.tsv")
    np.testing.assert_array_equal(medians.to_numpy(), summary.medians()["median"].to_numpy())


def write_old_format_summary(path: Path) -> Path:
    """A summary as gfw wrote it before exact values (format 1: one histogram, no ``format_version``)."""
    hist = sp.csr_matrix(([3, 1], ([0, 1], [700, 710])), shape=(2, N_BINS), dtype=np.int64)
    np.savez_compressed(
        path,
        gene_ids=np.array(GENES[:2]),
        data=hist.data,
        indices=hist.indices.astype(np.int32),
        indptr=hist.indptr.astype(np.int64),
        n_cells=np.int64(3),
        bin_ratio=np.float64(BIN_RATIO),
    )
    return path


def test_old_format_summary_is_refused_with_the_fix(tmp_path):
    old = write_old_format_summary(tmp_path / "old.npz")
    with pytest.raises(InputError, match=r"old\.npz: .*made by an older version of gfw.*rerun gfw summarize"):
        ExpressionSummary.load(old)
    status, err = run_gfw("medians", old, "-o", tmp_path / "m.tsv")
    assert status == 2
    assert str(old) in err and "older version" in err and "rerun gfw summarize" in err
    assert not (tmp_path / "m.tsv").exists()


def test_newer_format_and_foreign_files_are_refused(tmp_path):
    summary = summarize_h5ad(write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES))
    summary.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        arrays_ = dict(z)
    np.savez(tmp_path / "newer.npz", **{**arrays_, "format_version": np.int64(99)})
    with pytest.raises(InputError, match=r"newer\.npz: expression summary format 99 was made by a newer version"):
        ExpressionSummary.load(tmp_path / "newer.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match=r"other\.npz: not an expression summary"):
        ExpressionSummary.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("gene\tmedian\n")
    with pytest.raises(InputError, match=r"text\.npz: not an expression summary"):
        ExpressionSummary.load(tmp_path / "text.npz")


def test_corrupt_summary_is_refused(tmp_path):
    summary = summarize_h5ad(write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES))
    summary.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        arrays_ = dict(z)
    np.savez(tmp_path / "short.npz", **{**arrays_, "exact_values": arrays_["exact_values"][:-1]})
    with pytest.raises(InputError, match=r"short\.npz: corrupt expression summary: 6 exact values for 7"):
        ExpressionSummary.load(tmp_path / "short.npz")
    np.savez(tmp_path / "unsorted.npz", **{**arrays_, "exact_values": arrays_["exact_values"][::-1]})
    with pytest.raises(InputError, match=r"unsorted\.npz: corrupt expression summary: .*not sorted"):
        ExpressionSummary.load(tmp_path / "unsorted.npz")


def test_non_ensembl_ids_without_mapping_are_refused(tmp_path):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, ["CD3E", "CD4", "MS4A1", "LYZ"])
    with pytest.raises(ValueError, match="none of the 4 gene ids is an Ensembl gene id"):
        summarize_h5ad(h5ad)


def test_demo_medians_are_exact_whatever_the_file_split(tmp_path):
    import anndata as ad

    adata = ad.read_h5ad(DEMO)
    counts, n_counts = adata.X.toarray().astype(np.float64), adata.obs["n_counts"].to_numpy(np.float64)
    exact = exact_nonzero_medians(counts, list(adata.var_names), n_counts)
    whole = summarize_h5ad(DEMO)
    table = whole.medians().set_index("ensembl_id")["median"]
    assert adata.n_obs <= MAX_EXACT  # every gene of the 200-cell demo is below the bound
    assert set(table.index) == set(exact.index)
    np.testing.assert_array_equal(table, exact[table.index])
    paths = []
    for i, part in enumerate([adata[:120].copy(), adata[120:].copy()]):
        part.write_h5ad(tmp_path / f"part{i}.h5ad")
        paths.append(tmp_path / f"part{i}.h5ad")
    assert_same_summary(merge_summaries(summarize_h5ad(p) for p in paths[::-1]), whole)
