"""Bad inputs through the real `gfw` command: one-line error naming the file, exit code 2, no output.

The first tests run `gfw` as a subprocess; the later ones call its entry point in this process (faster).
"""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from geneformer_workflow.testing import write_counts_h5ad

from .cases import COUNTS, GENES, run_gfw


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


# -- in process (the real `gfw` entry point), through every command that reads the file ------------------

DATA_COMMANDS = ("qc", "summarize", "medians", "tokenize")


def _replace(f: h5py.File, name: str, values: np.ndarray) -> None:
    del f[name]
    f[name] = values


def _edited(tmp_path, edit, *, matrix_format="csr", **kwargs):
    """COUNTS (CSR: indptr [0, 3, 4, 7]) written by anndata, then changed with h5py by ``edit(file)``."""
    path = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES, matrix_format=matrix_format, **kwargs)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _zarr_store(tmp_path):
    path = tmp_path / "in.zarr"
    ad.AnnData(X=sp.csr_matrix(COUNTS), var=pd.DataFrame(index=GENES)).write_zarr(path)
    return path


def _as_h5sparse(f: h5py.File) -> None:
    """anndata 0.6's attributes, and no shape at all."""
    for key in ("encoding-type", "encoding-version", "shape"):
        del f["X"].attrs[key]
    f["X"].attrs["h5sparse_format"] = "csr"


# name -> (file builder, part of the message, commands that read the part concerned, extra arguments)
FILE_DEFECTS = {
    "csr-indptr-decreases": (
        lambda t: _edited(t, lambda f: _replace(f, "X/indptr", np.array([0, 5, 4, 7]))),
        "the X matrix (csr_matrix) is corrupt: indptr decreases at cell 'cell1' (row 1)",
        DATA_COMMANDS,
        [],
    ),
    "csr-indptr-beyond-entries": (
        lambda t: _edited(t, lambda f: _replace(f, "X/indptr", np.array([0, 9, 4, 7]))),
        "is corrupt: indptr holds 9 (rows 0:1), outside its 7 entries",
        DATA_COMMANDS,
        ["--chunk-size", "1"],
    ),
    "csr-indptr-too-short": (
        lambda t: _edited(t, lambda f: _replace(f, "X/indptr", np.array([0, 3, 7]))),
        "is corrupt: indptr has 3 values, but 3 cells need 4",
        DATA_COMMANDS,
        [],
    ),
    "csr-data-too-short": (
        lambda t: _edited(t, lambda f: _replace(f, "X/data", f["X/data"][:5])),
        "is corrupt: indices has 7 values but data 5",
        DATA_COMMANDS,
        [],
    ),
    "csr-entries-too-short": (
        lambda t: _edited(t, lambda f: [_replace(f, f"X/{k}", f[f"X/{k}"][:5]) for k in ("data", "indices")]),
        "is corrupt: indptr runs from 0 to 7, but data has 5 values (from 0)",
        DATA_COMMANDS,
        [],
    ),
    "csr-no-indices": (
        lambda t: _edited(t, lambda f: f["X"].__delitem__("indices")),
        "the X matrix (csr_matrix) is corrupt: it has no 'indices' dataset; the file is damaged or was written "
        "by a faulty tool; write it again (e.g. anndata's write_h5ad)",
        DATA_COMMANDS,
        [],
    ),
    "csr-2d-data": (
        lambda t: _edited(t, lambda f: _replace(f, "X/data", np.stack([f["X/data"][:]] * 2, axis=1))),
        "is corrupt: data has shape (7, 2), not one dimension",
        DATA_COMMANDS,
        [],
    ),
    "csr-float-indices": (
        lambda t: _edited(t, lambda f: _replace(f, "X/indices", f["X/indices"][:].astype(np.float64))),
        "is corrupt: indices holds float64 values, not integers",
        DATA_COMMANDS,
        [],
    ),
    "csr-column-out-of-range": (
        lambda t: _edited(t, lambda f: f["X/indices"].__setitem__(3, 4)),
        "is corrupt: column indices outside its 4 genes (rows from 0)",
        DATA_COMMANDS,
        [],
    ),
    "csr-text-data": (
        lambda t: _edited(t, lambda f: _replace(f, "X/data", f["X/data"][:].astype("S4"))),
        "the X matrix holds |S4 values, not numbers",
        DATA_COMMANDS,
        [],
    ),
    "h5sparse-without-shape": (
        lambda t: _edited(t, _as_h5sparse),
        "is corrupt: its shape attribute is None, not 2 sizes",
        DATA_COMMANDS,
        [],
    ),
    "csc-indptr-decreases": (
        lambda t: _edited(t, lambda f: f["X/indptr"].__setitem__(2, 0), matrix_format="csc"),
        "the X matrix (csc_matrix) is corrupt: indptr decreases at column 1",
        DATA_COMMANDS,
        [],
    ),
    "csc-row-out-of-range": (
        lambda t: _edited(t, lambda f: f["X/indices"].__setitem__(0, 7), matrix_format="csc"),
        "the X matrix (csc_matrix) is corrupt: row indices outside its 3 cells",
        DATA_COMMANDS,
        [],
    ),
    "dense-text": (
        lambda t: _edited(t, lambda f: _replace(f, "X", f["X"][:].astype("S4")), matrix_format="dense"),
        "the X matrix holds |S4 values, not numbers",
        DATA_COMMANDS,
        [],
    ),
    "no-obs": (
        lambda t: _edited(t, lambda f: f.__delitem__("obs")),
        "not a valid AnnData file (it has no obs, the cell annotations)",
        DATA_COMMANDS,
        [],
    ),
    "obs-not-a-dataframe": (
        lambda t: _edited(t, lambda f: _replace(f, "obs", np.arange(3))),
        "cannot read its obs/var annotations (ValueError: /obs is not a dataframe (a dataset of int64 values)",
        DATA_COMMANDS,
        [],
    ),
    "no-var": (
        lambda t: _edited(t, lambda f: f.__delitem__("var")),
        "has a X matrix but no var (its gene annotations)",
        DATA_COMMANDS,
        [],
    ),
    "layers-slash": (
        lambda t: write_counts_h5ad(t / "in.h5ad", COUNTS, GENES),
        "unknown count source 'layers/'; use 'X', 'raw' (raw.X) or 'layers/<name>'",
        DATA_COMMANDS,
        ["--counts", "layers/"],
    ),
    "layer-missing": (
        lambda t: write_counts_h5ad(t / "in.h5ad", COUNTS, GENES, where="layers/spliced"),
        "has no 'layers/counts' matrix (its layers: ['spliced'])",
        DATA_COMMANDS,
        ["--counts", "layers/counts"],
    ),
    "directory": (
        lambda t: (t / "in.h5ad").mkdir() or t / "in.h5ad",
        "is a directory, not an .h5ad file (zarr stores are not supported; convert one with "
        "anndata.read_zarr('{path}').write_h5ad(...))",
        DATA_COMMANDS,
        [],
    ),
    "zarr-store": (
        _zarr_store,
        "is a directory, not an .h5ad file (zarr stores are not supported; convert one with "
        "anndata.read_zarr('{path}').write_h5ad('{stem}.h5ad'))",
        DATA_COMMANDS,
        [],
    ),
    "n_counts-text": (
        lambda t: write_counts_h5ad(t / "in.h5ad", COUNTS, GENES, obs=pd.DataFrame({"n_counts": ["9", "many", "6"]})),
        "obs['n_counts'] holds values that are not numbers (e.g. 'many' in cell 'cell1'); n_counts must be each "
        "cell's total raw count (drop the column to have it computed)",
        ("summarize", "medians", "tokenize"),  # QC computes its own totals
        [],
    ),
    "filter_pass-text": (
        lambda t: write_counts_h5ad(
            t / "in.h5ad", COUNTS, GENES, obs=pd.DataFrame({"filter_pass": ["1", "maybe", "maybe"]})
        ),
        "obs['filter_pass'] of cell 'cell1' is 'maybe', expected 1 or 0 (True or False: 1 keeps the cell)",
        DATA_COMMANDS,
        [],
    ),
    "filter_pass-two": (
        lambda t: write_counts_h5ad(t / "in.h5ad", COUNTS, GENES, obs=pd.DataFrame({"filter_pass": [1, 0, 2]})),
        "obs['filter_pass'] of cell 'cell2' is 2, expected 1 or 0",
        DATA_COMMANDS,
        [],
    ),
    "filter_pass-missing-value": (
        lambda t: write_counts_h5ad(
            t / "in.h5ad", COUNTS, GENES, obs=pd.DataFrame({"filter_pass": pd.array([1, None, 1], dtype="Int64")})
        ),
        "obs['filter_pass'] of cell 'cell1' is nan, expected 1 or 0",
        DATA_COMMANDS,
        [],
    ),
}


def _command(name, h5ad, out, vocab, medians_tsv, extra):
    if name == "qc":
        return ["qc", h5ad, "-o", out / "qc.tsv", "--summary", out / "qc.json", *extra]
    if name == "summarize":
        return ["summarize", h5ad, "-o", out / "summary.npz", *extra]
    if name == "medians":
        return ["medians", h5ad, "-o", out / "medians.tsv", *extra]
    return [
        "tokenize",
        h5ad,
        out / "corpus.parquet",
        "--token-dictionary",
        vocab,
        "--gene-medians",
        medians_tsv,
        *extra,
    ]


@pytest.fixture
def vocab(tmp_path, medians_tsv):
    assert run_gfw("vocab", medians_tsv, "-o", tmp_path / "vocab")[0] == 0
    return tmp_path / "vocab"


@pytest.mark.parametrize("case", list(FILE_DEFECTS))
def test_every_command_names_the_file_and_the_defect(tmp_path, vocab, medians_tsv, case):
    build, expected, commands, extra = FILE_DEFECTS[case]
    work = tmp_path / "case"
    work.mkdir()
    h5ad = build(work)
    expected = expected.format(path=h5ad, stem=h5ad.with_suffix(""))
    for command in commands:
        out = tmp_path / f"out-{command}"
        out.mkdir()
        status, stderr = run_gfw(*_command(command, h5ad, out, vocab, medians_tsv, extra))
        assert (status, len(stderr.splitlines())) == (2, 1), stderr
        assert stderr.startswith(f"gfw {command}: error: {h5ad}: "), stderr
        assert expected in stderr, stderr
        assert not any(out.iterdir()), command  # nothing written, not even a part


@pytest.mark.parametrize("value", ["nan", "1", "1.5", "-0.1", "inf", "a tenth"])
def test_the_validation_fraction_must_be_a_fraction_below_one(tmp_path, vocab, medians_tsv, value):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    args = ["--token-dictionary", vocab, "--gene-medians", medians_tsv, "--validation-fraction", value]
    status, stderr = run_gfw("tokenize", h5ad, tmp_path / "out" / "corpus.parquet", *args)
    assert status == 2
    assert stderr.splitlines()[-1] == (
        "gfw tokenize: error: argument --validation-fraction: expected a fraction of the cells in [0, 1), e.g. 0.05 "
        f"(1 would leave none to train on), got {value!r}"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("value", "n_validation"), [("0", 0), ("0.999", 3)])
def test_a_validation_fraction_in_range_is_used(tmp_path, vocab, medians_tsv, value, n_validation):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    out = tmp_path / "corpus.parquet"
    args = ["--token-dictionary", vocab, "--gene-medians", medians_tsv, "--validation-fraction", value]
    assert run_gfw("tokenize", h5ad, out, *args)[0] == 0
    assert pq.read_table(out).column("split").to_pylist().count("validation") == n_validation


JSON_FILES = {
    "a-list": ('["ENSG00000000001", "ENSG00000000002"]', "holds an array [...], but a {what} is a JSON object"),
    "invalid": ('{"<pad>": 0,', "not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    "a-number": ("3", "holds a number, but a {what} is a JSON object"),
    "null": ("null", "holds null, but a {what} is a JSON object"),
}


@pytest.mark.parametrize("case", list(JSON_FILES))
def test_a_token_dictionary_that_is_not_a_json_object_is_named(tmp_path, medians_tsv, case):
    text, expected = JSON_FILES[case]
    bad = tmp_path / "tokens.json"
    bad.write_text(text)
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    out = tmp_path / "out"
    for args in (
        ["tokenize", h5ad, out / "corpus.parquet", "--token-dictionary", bad, "--gene-medians", medians_tsv],
        ["vocab", medians_tsv, "-o", out / "vocab", "--token-dictionary", bad],
    ):
        status, stderr = run_gfw(*args)
        assert (status, len(stderr.splitlines())) == (2, 1), stderr
        assert stderr.startswith(f"gfw {args[0]}: error: {bad}: "), stderr
        assert expected.format(what="token dictionary") in stderr
    assert not out.exists()


def test_a_token_id_that_is_not_an_integer_is_named(tmp_path, medians_tsv):
    bad = tmp_path / "tokens.json"
    bad.write_text(json.dumps({"<pad>": 0, "<mask>": 1, GENES[0]: "2"}))
    status, stderr = run_gfw("vocab", medians_tsv, "-o", tmp_path / "vocab", "--token-dictionary", bad)
    assert status == 2
    assert stderr == f"gfw vocab: error: {bad}: the token id of '{GENES[0]}' is '2', not an integer\n"


@pytest.mark.parametrize("case", [*JSON_FILES, "values-not-text"])
def test_a_gene_mapping_that_is_not_a_json_object_of_ids_is_named(tmp_path, case):
    text, expected = JSON_FILES.get(case, ('{"CD3E": 7}', "the gene mapping maps 'CD3E' to 7; the values must be"))
    bad = tmp_path / "mapping.json"
    bad.write_text(text)
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    status, stderr = run_gfw("summarize", h5ad, "-o", tmp_path / "s.npz", "--gene-mapping", bad)
    assert (status, len(stderr.splitlines())) == (2, 1), stderr
    assert stderr.startswith(f"gfw summarize: error: {bad}: "), stderr
    assert expected.format(what="gene mapping") in stderr
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("case", ["directory", "csr-no-indices", "h5sparse-without-shape", "no-var"])
def test_counting_cells_for_sharding_names_the_file_too(tmp_path, case):
    """Snakemake plans shards with `count_cells` when it parses the workflow: a bad file gets the same message."""
    from geneformer_workflow.tokenize.h5ad import InputError, count_cells

    build, expected, _, _ = FILE_DEFECTS[case]
    h5ad = build(tmp_path)
    with pytest.raises(InputError) as info:
        count_cells(h5ad)
    assert str(info.value).startswith(f"{h5ad}: ")
    assert expected.format(path=h5ad) in str(info.value)
