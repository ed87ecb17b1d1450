"""``gfw qc --expression-summary``: the gene-median summary in the same pass as QC, identical to ``gfw summarize
--cell-filter`` on the QC table (the two-pass way the workflow used before), written with the QC outputs or not at
all."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad

from .cases import run_gfw

N_CELLS, N_GENES = 157, 60
GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]


def archive_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def assert_same_archive(a, b) -> None:
    arrays_a, arrays_b = archive_arrays(a), archive_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, value in arrays_a.items():
        np.testing.assert_array_equal(value, arrays_b[name], err_msg=name, strict=True)


@pytest.fixture
def h5ad(tmp_path):
    """Cells of 2 to ~30 detected genes (so --min-genes drops some), an input filter_pass dropping others."""
    counts = synthetic_counts(N_CELLS, N_GENES, genes_per_cell=12, seed=3).toarray()
    counts[5] = 0  # a cell without counts
    obs = pd.DataFrame({"filter_pass": (np.arange(N_CELLS) % 9 != 0).astype(int)})
    return write_counts_h5ad(tmp_path / "in.h5ad", counts, GENES, obs=obs)


@pytest.mark.parametrize("chunk_size", ["7", "4096"])  # many chunks, and one
def test_the_one_pass_summary_equals_summarize_on_the_qc_table(tmp_path, h5ad, chunk_size):
    options = ["--min-genes", "10", "--max-pct-mito", "none", "--chunk-size", chunk_size]
    status, err = run_gfw("qc", h5ad, "-o", tmp_path / "qc.tsv", "--summary", tmp_path / "qc.json",
                          "--expression-summary", tmp_path / "one.npz", *options)  # fmt: skip
    assert status == 0, err
    status, err = run_gfw("summarize", h5ad, "-o", tmp_path / "two.npz", "--cell-filter", tmp_path / "qc.tsv")
    assert status == 0, err
    assert_same_archive(tmp_path / "one.npz", tmp_path / "two.npz")

    status, err = run_gfw("qc", h5ad, "-o", tmp_path / "plain.tsv", *options)  # the QC table does not change
    assert status == 0, err
    assert (tmp_path / "plain.tsv").read_bytes() == (tmp_path / "qc.tsv").read_bytes()
    kept = json.loads((tmp_path / "qc.json").read_text())["n_cells_kept"]
    assert 0 < kept < N_CELLS - N_CELLS // 9  # both filters dropped cells
    assert archive_arrays(tmp_path / "one.npz")["n_cells"] == kept


def test_gene_symbols_are_mapped_as_summarize_maps_them(tmp_path):
    symbols = [f"GENE{i}" for i in range(N_GENES)]
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({s: GENES[i // 2] for i, s in enumerate(symbols)}))  # pairs collapse to one id
    path = write_counts_h5ad(tmp_path / "symbols.h5ad", synthetic_counts(40, N_GENES, genes_per_cell=20).toarray(),
                             symbols)  # fmt: skip
    qc = ["qc", path, "-o", tmp_path / "qc.tsv", "--expression-summary", tmp_path / "one.npz", "--min-genes", "none"]
    assert run_gfw(*qc, "--gene-mapping", mapping)[0] == 0
    summarize = ["summarize", path, "-o", tmp_path / "two.npz", "--cell-filter", tmp_path / "qc.tsv"]
    assert run_gfw(*summarize, "--gene-mapping", mapping)[0] == 0
    assert_same_archive(tmp_path / "one.npz", tmp_path / "two.npz")
    assert len(archive_arrays(tmp_path / "one.npz")["gene_ids"]) == N_GENES // 2


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: write_counts_h5ad(d / "in.h5ad", np.ones((4, 3)), GENES[:3]),
         r"all 4 cells are filtered out \(obs filter_pass / QC thresholds\)"),
        (lambda d: write_counts_h5ad(d / "in.h5ad", np.ones((4, 3)), ["A", "B", "C"]),
         r"none of the 3 gene ids is an Ensembl gene id"),
    ],
)  # fmt: skip
def test_a_file_without_a_summary_gets_an_error_and_no_qc_outputs(tmp_path, make_input, message):
    path = make_input(tmp_path)
    outputs = [tmp_path / "qc.tsv", tmp_path / "qc.json", tmp_path / "qc.png", tmp_path / "one.npz"]
    status, err = run_gfw("qc", path, "-o", outputs[0], "--summary", outputs[1], "--plot", outputs[2],
                          "--expression-summary", outputs[3], "--min-genes", "200")  # fmt: skip
    assert status != 0
    assert str(path) in err and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]  # nothing written, no temporary files left
