from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from geneformer_workflow.medians import (
    BIN_RATIO,
    ExpressionSummary,
    merge_summaries,
    read_medians,
    summarize_h5ad,
    write_medians_tsv,
)
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad

from .cases import COUNTS, GENES


def exact_nonzero_medians(counts: np.ndarray, genes: list[str], n_counts: np.ndarray) -> pd.Series:
    normalised = counts / n_counts[:, None] * 10_000
    return pd.Series(
        {g: np.median(normalised[counts[:, j] > 0, j]) for j, g in enumerate(genes) if (counts[:, j] > 0).any()}
    )


def test_medians_of_hand_checked_cells(tmp_path):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    table = summarize_h5ad(h5ad).medians().set_index("ensembl_id")
    exact = exact_nonzero_medians(COUNTS, GENES, COUNTS.sum(1))
    assert table.index.tolist() == GENES
    np.testing.assert_allclose(table["median"], exact[GENES], rtol=BIN_RATIO - 1)
    assert table["n_cells_detected"].tolist() == [2, 1, 2, 2]


def test_medians_within_one_percent_of_exact_on_synthetic_data(tmp_path):
    counts = synthetic_counts(600, 300, genes_per_cell=80, seed=1).toarray()
    genes = [f"ENSG{i:011d}" for i in range(300)]
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, genes)
    table = summarize_h5ad(h5ad, chunk_size=128).medians().set_index("ensembl_id")["median"]
    exact = exact_nonzero_medians(counts, genes, counts.sum(1))
    rel = (table[exact.index] / exact - 1).abs()
    assert rel.max() < 0.01


def test_merge_is_independent_of_file_split_and_order(tmp_path):
    counts = synthetic_counts(300, 120, genes_per_cell=40, seed=2).toarray()
    genes = [f"ENSG{i:011d}" for i in range(120)]
    whole = summarize_h5ad(write_counts_h5ad(tmp_path / "all.h5ad", counts, genes))
    parts = [
        summarize_h5ad(
            write_counts_h5ad(tmp_path / f"p{i}.h5ad", counts[lo:hi], genes, cell_ids=[f"c{j}" for j in range(lo, hi)])
        )
        for i, (lo, hi) in enumerate([(0, 50), (50, 220), (220, 300)])
    ]
    forward = merge_summaries(parts).medians()
    backward = merge_summaries(parts[::-1]).medians()
    pd.testing.assert_frame_equal(forward, backward)
    pd.testing.assert_frame_equal(forward, whole.medians())


def test_merge_unions_gene_sets(tmp_path):
    a = summarize_h5ad(write_counts_h5ad(tmp_path / "a.h5ad", COUNTS[:, :2], GENES[:2]))
    b = summarize_h5ad(write_counts_h5ad(tmp_path / "b.h5ad", COUNTS[:, 2:], GENES[2:]))
    assert merge_summaries([a, b]).medians()["ensembl_id"].tolist() == GENES


def test_summary_and_table_round_trip(tmp_path):
    summary = summarize_h5ad(write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES))
    summary.save(tmp_path / "s.npz")
    loaded = ExpressionSummary.load(tmp_path / "s.npz")
    assert (loaded.histogram != summary.histogram).nnz == 0
    assert loaded.gene_ids.tolist() == summary.gene_ids.tolist()
    write_medians_tsv(summary.medians(), tmp_path / "m.tsv")
    medians = read_medians(tmp_path / "m.tsv")
    np.testing.assert_array_equal(medians.to_numpy(), summary.medians()["median"].to_numpy())


def test_non_ensembl_ids_without_mapping_are_refused(tmp_path):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, ["CD3E", "CD4", "MS4A1", "LYZ"])
    with pytest.raises(ValueError, match="none of the 4 gene ids is an Ensembl gene id"):
        summarize_h5ad(h5ad)


def test_empty_summary_merges_to_identity(tmp_path):
    summary = summarize_h5ad(write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES))
    merged = ExpressionSummary.empty().merge(summary)
    assert sp.csr_matrix(merged.histogram != summary.histogram).nnz == 0


def test_demo_medians_within_one_percent_of_exact_whatever_the_file_split(tmp_path):
    import anndata as ad

    demo = Path(__file__).resolve().parents[2] / "resources/demo/pbmc_5k_protein_v3.h5ad"
    adata = ad.read_h5ad(demo)
    counts, n_counts = adata.X.toarray().astype(np.float64), adata.obs["n_counts"].to_numpy(np.float64)
    exact = exact_nonzero_medians(counts, list(adata.var_names), n_counts)
    whole = summarize_h5ad(demo).medians().set_index("ensembl_id")["median"]
    assert set(whole.index) == set(exact.index)
    assert ((whole[exact.index] / exact - 1).abs() < 0.01).all()
    halves = [adata[:120].copy(), adata[120:].copy()]
    paths = []
    for i, part in enumerate(halves):
        part.write_h5ad(tmp_path / f"part{i}.h5ad")
        paths.append(tmp_path / f"part{i}.h5ad")
    split = merge_summaries([summarize_h5ad(p) for p in paths[::-1]]).medians().set_index("ensembl_id")["median"]
    pd.testing.assert_series_equal(split, whole)
