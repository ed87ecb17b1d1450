"""Bad inputs through the real `gfw` command: one-line error naming the file, exit code 2, no output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from geneformer_workflow.testing import write_counts_h5ad

from .cases import COUNTS, GENES


def gfw(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "geneformer_workflow", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _bad_file(tmp_path, case):
    path = tmp_path / "in.h5ad"
    if case == "not-h5ad":
        path.write_text("cell,gene\n1,2\n")
    elif case == "truncated":
        write_counts_h5ad(path, COUNTS, GENES)
        path.write_bytes(path.read_bytes()[:2000])
    elif case == "log-normalised":
        write_counts_h5ad(path, np.log1p(COUNTS), GENES)
    elif case == "negative":
        write_counts_h5ad(path, COUNTS - 2, GENES, matrix_format="dense")
    elif case == "nan":
        write_counts_h5ad(path, np.where(COUNTS > 3, np.nan, COUNTS), GENES, matrix_format="dense")
    elif case == "transposed":
        write_counts_h5ad(path, COUNTS.T, ["c0", "c1", "c2"], cell_ids=GENES)
    elif case == "symbols":
        write_counts_h5ad(path, COUNTS, ["CD3E", "CD4", "MS4A1", "LYZ"])
    elif case == "all-filtered":
        write_counts_h5ad(path, COUNTS, GENES, obs=pd.DataFrame({"filter_pass": [0, 0, 0]}))
    elif case == "duplicate-cells":
        write_counts_h5ad(path, COUNTS, GENES, cell_ids=["a", "b", "a"])
    elif case == "n_counts-too-small":
        write_counts_h5ad(path, COUNTS, GENES, obs=pd.DataFrame({"n_counts": [9.0, 1.0, 6.0]}))
    elif case == "n_counts-zero":
        write_counts_h5ad(path, COUNTS, GENES, obs=pd.DataFrame({"n_counts": [0.0, 3.0, 6.0]}))
    elif case == "n_counts-nan":
        write_counts_h5ad(path, COUNTS, GENES, obs=pd.DataFrame({"n_counts": [np.nan, 3.0, 6.0]}))
    elif case == "no-cells":
        write_counts_h5ad(path, COUNTS[:0], GENES)
    else:  # cases whose file is fine and whose arguments are wrong
        write_counts_h5ad(path, COUNTS, GENES)
    return path


CASES = {
    "not-h5ad": "not a readable .h5ad",
    "truncated": "not a readable .h5ad",
    "log-normalised": "non-integer counts",
    "negative": "negative counts",
    "nan": "NaN or infinite counts",
    "transposed": "transposed",
    "symbols": "gene ids is in the vocabulary",
    "all-filtered": "all 3 cells are filtered out",
    "duplicate-cells": "duplicate cell ids",
    "n_counts-too-small": "n_counts'] is inconsistent",
    "n_counts-zero": "n_counts'] is inconsistent",
    "n_counts-nan": "n_counts'] is inconsistent",
    "no-cells": "the count matrix is empty",
    "medians-from-another-vocabulary": "come from different vocabularies",
    "v2-preset-with-v1-vocabulary": "needs <cls> and <eos>",
    "rows-outside-file": "outside the file's 3 cells",
    "qc-table-of-another-file": "QC table does not list the cells",
}


def _extra_args(tmp_path, case):
    if case == "medians-from-another-vocabulary":
        other = tmp_path / "other_medians.tsv"
        other.write_text("ensembl_id\tmedian\nENSG00000099999\t1.0\n")
        return ["--gene-medians", other]
    if case == "v2-preset-with-v1-vocabulary":
        return ["--preset", "v2"]
    if case == "rows-outside-file":
        return ["--rows", "2:9"]
    if case == "qc-table-of-another-file":
        qc = tmp_path / "qc.tsv"
        qc.write_text("cell_id\tfilter_pass\nx\t1\ny\t1\nz\t1\n")
        return ["--cell-filter", qc]
    return []


@pytest.mark.parametrize("case", list(CASES))
def test_tokenize_refuses_bad_input_cleanly(tmp_path, medians_tsv, case):
    h5ad = _bad_file(tmp_path, case)
    vocab = tmp_path / "vocab"
    assert gfw("vocab", medians_tsv, "-o", vocab, cwd=tmp_path).returncode == 0
    out = tmp_path / "out" / "corpus.parquet"
    args = ["--token-dictionary", vocab, "--gene-medians", medians_tsv, *_extra_args(tmp_path, case)]
    result = gfw("tokenize", h5ad, out, *args, cwd=tmp_path)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("gfw tokenize: error:")
    assert CASES[case] in error
    assert str(h5ad) in error or "--" in error or "preset" in error
    out_dir = tmp_path / "out"
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_missing_gene_id_column_is_named(tmp_path, medians_tsv):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    result = gfw("medians", h5ad, "-o", tmp_path / "m.tsv", "--gene-id-key", "ensembl", cwd=tmp_path)
    assert result.returncode == 2
    assert "var has no column 'ensembl'" in result.stderr
    assert not (tmp_path / "m.tsv").exists()


def test_wrong_count_source_is_named(tmp_path):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    result = gfw("qc", h5ad, "-o", tmp_path / "qc.tsv", "--counts", "layers/counts", cwd=tmp_path)
    assert result.returncode == 2
    assert "has no 'layers/counts' matrix" in result.stderr
    assert not (tmp_path / "qc.tsv").exists()


MEDIAN_TABLES = {
    "zero": ("ensembl_id\tmedian\n{g0}\t0\n{g1}\t1.5\n", "not positive finite numbers (e.g. {g0})"),
    "text": ("ensembl_id\tmedian\n{g0}\tlots\n", "not positive finite numbers (e.g. {g0})"),
    "no-median-column": ("ensembl_id\tvalue\n{g0}\t1.0\n", "needs the columns ensembl_id and median"),
    "empty": ("", "needs the columns ensembl_id and median"),
    "short-row": ("ensembl_id\tn\tmedian\n{g0}\t3\n", "line 2 has 2 columns"),
    "duplicate-gene": ("ensembl_id\tmedian\n{g0}\t1.0\n{g0}\t2.0\n", "gene {g0} has more than one median"),
}


@pytest.mark.parametrize("case", list(MEDIAN_TABLES))
def test_a_bad_gene_median_table_is_named(tmp_path, medians_tsv, case):
    text, expected = (t.format(g0=GENES[0], g1=GENES[1]) for t in MEDIAN_TABLES[case])
    bad = tmp_path / "bad_medians.tsv"
    bad.write_text(text)
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    vocab = tmp_path / "vocab"
    assert gfw("vocab", medians_tsv, "-o", vocab, cwd=tmp_path).returncode == 0
    out = tmp_path / "out" / "corpus.parquet"
    result = gfw("tokenize", h5ad, out, "--token-dictionary", vocab, "--gene-medians", bad, cwd=tmp_path)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"gfw tokenize: error: {bad}: ")
    assert expected in error
    assert not out.parent.exists()


def test_a_qc_table_with_a_bad_verdict_is_named(tmp_path, medians_tsv):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    qc = tmp_path / "qc.tsv"
    qc.write_text("cell_id\tfilter_pass\ncell0\t1\ncell1\tmaybe\ncell2\t0\n")
    vocab = tmp_path / "vocab"
    assert gfw("vocab", medians_tsv, "-o", vocab, cwd=tmp_path).returncode == 0
    out = tmp_path / "out" / "corpus.parquet"
    args = ["--token-dictionary", vocab, "--gene-medians", medians_tsv, "--cell-filter", qc]
    result = gfw("tokenize", h5ad, out, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert f"{qc}: filter_pass of cell 'cell1' is 'maybe', expected 1 or 0" in result.stderr
    assert not out.parent.exists()
