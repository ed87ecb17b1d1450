"""The medians merge at scale: dense bin counts equal a plain sparse sum, and inputs come from a list file."""

from __future__ import annotations

import io
import sys

import numpy as np
import pandas as pd
import scipy.sparse as sp
from geneformer_workflow.tokenize._median_sketch import BinCounts, bin_index
from geneformer_workflow.tokenize.medians import N_BINS, ExpressionSummary, merge_summaries

from .cases import run_gfw


def random_summary(seed: int, genes: list[str], *, cells: int = 40, max_exact: int = 5) -> ExpressionSummary:
    """A summary of seeded values over a seeded subset of ``genes`` (some genes over the bound, some under)."""
    rng = np.random.default_rng(seed)
    subset = sorted(rng.choice(genes, size=len(genes) // 2 + 1, replace=False).tolist())
    gene_index = rng.integers(0, len(subset), size=int(rng.integers(3, 4 * cells)))  # some genes over the bound
    values = np.exp(rng.normal(1.0, 2.0, size=gene_index.size))  # also beyond [1e-3, 1e4]: the end bins
    return ExpressionSummary.from_values(subset, gene_index, values, n_cells=cells, max_exact=max_exact)


def plain_histogram(rows: np.ndarray, values: np.ndarray, n_rows: int) -> sp.csr_matrix:
    """The histogram by scipy's own COO to CSR sum, for comparison."""
    ones = np.ones(rows.size, dtype=np.int64)
    matrix = sp.coo_matrix((ones, (rows, bin_index(values))), shape=(n_rows, N_BINS)).tocsr()
    matrix.sum_duplicates()
    return matrix


def test_bin_counts_equal_a_sparse_sum_and_survive_a_growing_gene_list():
    rng = np.random.default_rng(0)
    bins = BinCounts(6)
    rows_a, values_a = rng.integers(0, 6, 500), np.exp(rng.normal(0, 3, 500))
    bins.add_values(rows_a, values_a)
    # the gene list grows from 6 to 9 genes: old gene i becomes gene old_rows[i]
    old_rows = np.array([0, 2, 3, 5, 6, 8])
    bins.regenes(old_rows, 9)
    rows_b, values_b = rng.integers(0, 9, 700), np.exp(rng.normal(0, 3, 700))
    bins.add_values(rows_b, values_b)
    histogram = plain_histogram(np.concatenate([old_rows[rows_a], rows_b]), np.concatenate([values_a, values_b]), 9)
    bins.add_histogram(histogram)  # adding a histogram doubles every count
    result = bins.to_csr()
    assert result.has_canonical_format and result.dtype == np.int64
    assert (result != 2 * histogram).nnz == 0
    assert result.shape == (9, N_BINS)


def test_bin_counts_of_no_values_are_an_empty_histogram():
    result = BinCounts(4).to_csr()
    assert result.shape == (4, N_BINS) and result.nnz == 0
    assert result.indptr.tolist() == [0, 0, 0, 0, 0]


def reference_merge(summaries: list[ExpressionSummary], genes: list[str], max_exact: int) -> ExpressionSummary:
    """The merge by its definition: per gene, all exact values while within the bound, else one summed histogram."""
    union = np.array(genes)
    n_detected = np.zeros(union.size, dtype=np.int64)
    rows, values, histogram = [], [], sp.csr_matrix((union.size, N_BINS), dtype=np.int64)
    for summary in summaries:
        at = np.searchsorted(union, summary.gene_ids.astype(str))
        n_detected[at] += summary.n_detected
        rows.append(at.repeat(np.diff(summary.exact_offsets)))
        values.append(summary.exact_values)
        histogram = histogram + _placed(summary.histogram, at, union.size)
    rows, values = np.concatenate(rows), np.concatenate(values)
    exact = n_detected[rows] <= max_exact
    histogram = histogram + plain_histogram(rows[~exact], values[~exact], union.size)
    order = np.lexsort((values[exact], rows[exact]))
    histogram.sum_duplicates()
    histogram.eliminate_zeros()
    return ExpressionSummary(
        union.astype(object), n_detected, values[exact][order], histogram, sum(s.n_cells for s in summaries), max_exact
    )


def _placed(histogram: sp.csr_matrix, rows: np.ndarray, n_rows: int) -> sp.csr_matrix:
    """``histogram`` with its row ``i`` at row ``rows[i]`` of ``n_rows``."""
    coo = histogram.tocoo()
    return sp.coo_matrix((coo.data.astype(np.int64), (rows[coo.row], coo.col)), shape=(n_rows, N_BINS)).tocsr()


def test_streamed_merge_of_many_summaries_equals_the_merge_by_definition():
    genes = [f"ENSG{i:011d}" for i in range(12)]
    summaries = [random_summary(seed, genes) for seed in range(30)]
    assert any(s.histogram.nnz for s in summaries) and any(s.exact_values.size for s in summaries)
    merged = merge_summaries(iter(summaries))  # a generator: one summary at a time
    expected = reference_merge(summaries, genes, 5)
    assert merged.gene_ids.tolist() == expected.gene_ids.tolist()
    np.testing.assert_array_equal(merged.n_detected, expected.n_detected)
    assert merged.exact_values.tobytes() == expected.exact_values.tobytes()
    assert merged.histogram.has_canonical_format
    assert (merged.histogram != expected.histogram).nnz == 0
    assert merged.n_cells == expected.n_cells == 30 * 40
    pd.testing.assert_frame_equal(merged.medians(), expected.medians())


def test_medians_read_their_inputs_from_a_list_file_or_standard_input(tmp_path, monkeypatch):
    genes = [f"ENSG{i:011d}" for i in range(12)]
    paths = []
    for seed in range(4):
        paths.append(tmp_path / f"dir with space/s{seed}.npz")
        paths[-1].parent.mkdir(exist_ok=True)
        random_summary(seed, genes).save(paths[-1])
    status, err = run_gfw("medians", *paths, "-o", tmp_path / "args.tsv")
    assert status == 0, err
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in paths[1:]) + "\n")  # a trailing blank line is skipped
    status, err = run_gfw("medians", paths[0], "--inputs-from", listing, "-o", tmp_path / "file.tsv")
    assert status == 0, err
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{p}\n" for p in paths)))
    status, err = run_gfw("medians", "--inputs-from", "-", "-o", tmp_path / "stdin.tsv")
    assert status == 0, err
    expected = (tmp_path / "args.tsv").read_bytes()
    assert (tmp_path / "file.tsv").read_bytes() == expected
    assert (tmp_path / "stdin.tsv").read_bytes() == expected
    assert len(pd.read_csv(tmp_path / "args.tsv", sep="\t")) > 0


def test_medians_without_inputs_or_with_a_missing_list_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    status, err = run_gfw("medians", "--inputs-from", empty, "-o", tmp_path / "m.tsv")
    assert status == 2 and f"{empty} lists no path" in err
    status, err = run_gfw("medians", "-o", tmp_path / "m.tsv")
    assert status == 2 and "no input given" in err
    status, err = run_gfw("medians", "--inputs-from", tmp_path / "missing.txt", "-o", tmp_path / "m.tsv")
    assert status == 2 and "missing.txt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.tsv").exists()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'x.npz'}\n")
    status, err = run_gfw("medians", "--inputs-from", listing, "-o", listing, "--overwrite")
    assert status == 2 and "also an input" in err
    assert listing.read_text() == f"{tmp_path / 'x.npz'}\n"  # the list is an input: kept
