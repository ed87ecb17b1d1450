"""Old and unusual encodings of the same counts are read exactly as the file current anndata writes.

Files of anndata 0.6 and older (compound-dtype ``obs``/``var``, ``h5sparse_format`` matrices, ``raw.X``),
float16 counts, and ``filter_pass`` stored as text or booleans: every variant of one small dataset goes
through the real ``gfw qc``, ``gfw summarize``, ``gfw medians`` and ``gfw tokenize``, and each output
must equal the one from the same data written by current anndata (float32 CSR, integer ``filter_pass``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad
from geneformer_workflow.tokenize._h5frame import read_dataframe
from geneformer_workflow.tokenize.h5ad import H5adCounts, count_cells

from .cases import run_gfw

N_CELLS, N_GENES = 40, 12
GENE_IDS = [f"ENSG{i:011d}" for i in range(1, N_GENES + 1)]


def _dataset() -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Counts, obs and var: n_counts above the row sums (genes not in the file), some cells filtered out."""
    rng = np.random.default_rng(7)
    counts = synthetic_counts(N_CELLS, N_GENES, genes_per_cell=7, seed=3).toarray().astype(np.float32)
    obs = pd.DataFrame(
        {
            "n_counts": counts.sum(1).astype(np.float64) + rng.integers(0, 5, N_CELLS),
            "filter_pass": (np.arange(N_CELLS) % 6 != 0).astype(np.int64),
            "cell_type": rng.choice(["B", "NK", "T"], N_CELLS).astype(object),
        },
        index=[f"cell{i:02d}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame({"gene_symbol": ["MT-CO1", *(f"GENE{i}" for i in range(1, N_GENES))]}, index=GENE_IDS)
    return counts, obs, var


# -- a writer of anndata 0.6 files ------------------------------------------------------------------------
# Follows anndata 0.6.22.post1 (`pip download anndata==0.6.22.post1 --no-binary :all:`):
# anndata/readwrite/write.py `_write_h5ad` and `_write_key_value_to_h5` (one HDF5 object per key of
# `AnnData._to_dict_fixed_width_arrays`: X, obs, var, uns/..., layers/..., raw.X, raw.var, raw.cat/...),
# anndata/core/anndata.py `df_to_records_fixed_width` (a dataframe is one record array: "index" first,
# string columns as variable-length strings, categoricals as their codes with the categories in
# uns/<column>_categories) and `strings_to_categoricals` (string columns with fewer distinct values
# than rows become categoricals, categories sorted), and anndata/h5py/h5sparse.py `Group.create_dataset`
# (a sparse matrix is a group with attributes h5sparse_format = "csr"/"csc" and h5sparse_shape, and
# datasets data, indices, indptr created with maxshape=(None,)).


def _records(frame: pd.DataFrame, *, fixed_width: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``df_to_records_fixed_width`` after ``strings_to_categoricals``: the record array and the categories."""

    def text(values: np.ndarray) -> np.ndarray:
        if not fixed_width:
            return values.astype(object)
        width = max((len(str(v).encode()) for v in values), default=1)
        return np.array([str(v).encode() for v in values], dtype=f"S{width}")

    uns, names, arrays = {}, ["index"], [text(frame.index.to_numpy())]
    for column in frame.columns:
        values = frame[column].to_numpy()
        names.append(column)
        if values.dtype == object:
            categories = np.unique(values.astype(str))
            if len(categories) < len(values):  # strings_to_categoricals
                uns[f"{column}_categories"] = categories
                arrays.append(np.searchsorted(categories, values.astype(str)).astype(np.int8))
                continue
            arrays.append(text(values))
        else:
            arrays.append(values)
    dtype = [(n, h5py.string_dtype() if a.dtype == object else a.dtype) for n, a in zip(names, arrays, strict=True)]
    records = np.empty(len(frame), dtype=dtype)
    for name, values in zip(names, arrays, strict=True):
        records[name] = values
    return records, uns


def _write_matrix(f: h5py.File, key: str, matrix: sp.spmatrix | np.ndarray) -> None:
    if not sp.issparse(matrix):
        f.create_dataset(key, data=matrix)
        return
    group = f.create_group(key)
    group.attrs["h5sparse_format"] = matrix.format
    group.attrs["h5sparse_shape"] = matrix.shape
    for name in ("data", "indices", "indptr"):
        group.create_dataset(name, data=getattr(matrix, name), maxshape=(None,))


def write_legacy_h5ad(
    path: Path,
    matrix: sp.spmatrix | np.ndarray,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    *,
    where: str = "X",
    fixed_width: bool = False,
) -> Path:
    """Write an ``.h5ad`` as anndata 0.6 did, with the counts in ``X``, ``raw`` (raw.X) or ``layers/<name>``.

    The slots that do not hold the counts hold a log-normalised copy, as real files do.
    """
    dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    log_norm = np.log1p(dense / np.maximum(dense.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    like = type(matrix) if sp.issparse(matrix) else np.asarray
    obs_records, uns = _records(obs, fixed_width=fixed_width)
    var_records, var_uns = _records(var, fixed_width=fixed_width)
    with h5py.File(path, "w") as f:
        _write_matrix(f, "X", matrix if where == "X" else like(log_norm))
        f.create_dataset("obs", data=obs_records)
        f.create_dataset("var", data=var_records)
        for key, categories in {**uns, **var_uns}.items():
            f.create_dataset(f"uns/{key}", data=categories.astype(object), dtype=h5py.string_dtype())
        if where == "raw":
            _write_matrix(f, "raw.X", matrix)
            f.create_dataset("raw.var", data=var_records)
        elif where.startswith("layers/"):
            _write_matrix(f, where, matrix)
    return path


# -- the variants -----------------------------------------------------------------------------------------


def _float16_csr(path: Path, counts: np.ndarray, obs: pd.DataFrame, var: pd.DataFrame) -> Path:
    """CSR data stored as float16 (scipy and so anndata cannot write it; other tools do)."""
    write_counts_h5ad(path, counts, GENE_IDS, obs=obs, var=var, cell_ids=list(obs.index))
    with h5py.File(path, "r+") as f:
        data = f["X/data"][:]
        del f["X/data"]
        f["X/data"] = data.astype(np.float16)
    return path


def _anndata_file(path: Path, x: object, obs: pd.DataFrame, var: pd.DataFrame) -> Path:
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return path


def _text_filter_pass(obs: pd.DataFrame, true: str, false: str) -> pd.DataFrame:
    return obs.assign(filter_pass=np.where(obs["filter_pass"] == 1, true, false).astype(object))


# name -> (writer(path, counts, obs, var), --counts)
VARIANTS = {
    "legacy-csr": (lambda p, c, o, v: write_legacy_h5ad(p, sp.csr_matrix(c), o, v), "X"),
    "legacy-csc": (lambda p, c, o, v: write_legacy_h5ad(p, sp.csc_matrix(c), o, v), "X"),
    "legacy-dense": (lambda p, c, o, v: write_legacy_h5ad(p, c, o, v), "X"),
    "legacy-fixed-width-strings": (
        lambda p, c, o, v: write_legacy_h5ad(p, sp.csr_matrix(c), o, v, fixed_width=True),
        "X",
    ),
    "legacy-raw": (lambda p, c, o, v: write_legacy_h5ad(p, sp.csr_matrix(c), o, v, where="raw"), "raw"),
    "legacy-layer": (
        lambda p, c, o, v: write_legacy_h5ad(p, sp.csr_matrix(c), o, v, where="layers/counts"),
        "layers/counts",
    ),
    "legacy-filter_pass-text": (
        lambda p, c, o, v: write_legacy_h5ad(p, sp.csr_matrix(c), _text_filter_pass(o, "1", "0"), v),
        "X",
    ),
    "float16-dense": (lambda p, c, o, v: _anndata_file(p, c.astype(np.float16), o, v), "X"),
    "float16-csr": (_float16_csr, "X"),
    "integer-csr": (lambda p, c, o, v: _anndata_file(p, sp.csr_matrix(c.astype(np.int32)), o, v), "X"),
    "filter_pass-text-1-0": (
        lambda p, c, o, v: _anndata_file(p, sp.csr_matrix(c), _text_filter_pass(o, "1", "0"), v),
        "X",
    ),
    "filter_pass-text-True-False": (
        lambda p, c, o, v: _anndata_file(p, sp.csr_matrix(c), _text_filter_pass(o, "True", "False"), v),
        "X",
    ),
    "filter_pass-bool": (
        lambda p, c, o, v: _anndata_file(p, sp.csr_matrix(c), o.assign(filter_pass=o["filter_pass"] == 1), v),
        "X",
    ),
}


def _outputs(work: Path, h5ad: Path, counts: str, vocab: Path, medians: Path) -> dict[str, object]:
    """Run qc, summarize, medians and tokenize on ``h5ad``; their outputs, in comparable form."""
    work.mkdir()
    source = ["--counts", counts]
    runs = {
        "qc": ["qc", h5ad, "-o", work / "qc.tsv", "--min-genes", "3", *source],
        "summarize": ["summarize", h5ad, "-o", work / "summary.npz", *source],
        "medians": ["medians", h5ad, "-o", work / "medians.tsv", *source],
        "tokenize": [
            "tokenize",
            h5ad,
            work / "corpus.parquet",
            *("--token-dictionary", vocab, "--gene-medians", medians),
            *("--obs-columns", "cell_type,n_counts", "--validation-fraction", "0.2", "--chunk-size", "16"),
            *source,
        ],
    }
    for name, args in runs.items():
        status, stderr = run_gfw(*args)
        assert status == 0, f"gfw {name}: {stderr}"
    with np.load(work / "summary.npz") as z:
        summary = {k: z[k].tolist() for k in z.files}
    return {
        "qc": (work / "qc.tsv").read_text(),
        "summarize": summary,
        "medians": (work / "medians.tsv").read_text(),
        "tokenize": pq.read_table(work / "corpus.parquet").to_pydict(),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The dataset as current anndata writes it, a vocabulary from its medians, and the four commands' outputs."""
    root = tmp_path_factory.mktemp("reference")
    counts, obs, var = _dataset()
    h5ad = write_counts_h5ad(root / "modern.h5ad", counts, GENE_IDS, obs=obs, var=var, cell_ids=list(obs.index))
    medians = root / "gene_medians.tsv"
    assert run_gfw("medians", h5ad, "-o", medians)[0] == 0
    assert run_gfw("vocab", medians, "-o", root / "vocab")[0] == 0
    outputs = _outputs(root / "out", h5ad, "X", root / "vocab", medians)
    return root, outputs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_command_reads_the_variant_as_the_modern_file(tmp_path, reference, variant):
    root, expected = reference
    write, counts_source = VARIANTS[variant]
    counts, obs, var = _dataset()
    h5ad = write(tmp_path / f"{variant}.h5ad", counts, obs, var)
    outputs = _outputs(tmp_path / "out", h5ad, counts_source, root / "vocab", root / "gene_medians.tsv")
    assert len(expected["tokenize"]["cell_id"]) == N_CELLS - N_CELLS // 6 - 1  # filter_pass took effect
    for command, output in outputs.items():
        assert output == expected[command], f"gfw {command} differs on {variant}"


@pytest.mark.parametrize("fixed_width", [False, True])
def test_legacy_frames_equal_what_anndata_reads(tmp_path, fixed_width):
    """Our reading of compound obs/var (and of uns categories) equals anndata's: the writer above is faithful."""
    counts, obs, var = _dataset()
    obs = _text_filter_pass(obs, "1", "0")
    path = write_legacy_h5ad(tmp_path / "legacy.h5ad", sp.csr_matrix(counts), obs, var, fixed_width=fixed_width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's OldFormatWarning
        adata = ad.read_h5ad(path)
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert adata.obs["cell_type"].dtype == "category" and adata.obs["filter_pass"].dtype == "category"
    with h5py.File(path) as f:
        for name, theirs in (("obs", adata.obs), ("var", adata.var)):
            pd.testing.assert_frame_equal(read_dataframe(f[name]), theirs, check_index_type=False)
    with H5adCounts(path) as reader:
        assert reader.cell_ids.tolist() == obs.index.tolist()
        assert reader.gene_ids.tolist() == GENE_IDS
        assert reader.obs_columns == ["n_counts", "filter_pass", "cell_type"]
        assert reader.obs_column("filter_pass").to_numpy().tolist() == obs["filter_pass"].tolist()
        assert reader.encoding == "csr_matrix"
        rows = sp.vstack([chunk.matrix for chunk in reader.iter_chunks(7)])
        np.testing.assert_array_equal(rows.toarray(), counts)
    assert count_cells(path) == N_CELLS


@pytest.mark.parametrize(("where", "matrix"), [("raw", sp.csr_matrix), ("layers/counts", sp.csc_matrix)])
def test_legacy_raw_and_layers_are_found(tmp_path, where, matrix):
    counts, obs, var = _dataset()
    path = write_legacy_h5ad(tmp_path / "legacy.h5ad", matrix(counts), obs, var, where=where)
    assert count_cells(path, where) == N_CELLS
    with H5adCounts(path, counts=where, gene_id_key="gene_symbol") as reader:
        assert reader.gene_ids.tolist() == var["gene_symbol"].tolist()
        np.testing.assert_array_equal(sp.vstack([c.matrix for c in reader.iter_chunks(9)]).toarray(), counts)


def test_legacy_raw_without_raw_var_is_named(tmp_path):
    counts, obs, var = _dataset()
    path = write_legacy_h5ad(tmp_path / "legacy.h5ad", sp.csr_matrix(counts), obs, var, where="raw")
    with h5py.File(path, "r+") as f:
        del f["raw.var"]
    status, stderr = run_gfw("summarize", path, "-o", tmp_path / "s.npz", "--counts", "raw")
    assert status == 2
    assert stderr.strip() == (
        f"gfw summarize: error: {path}: has a raw.X matrix but no raw.var (its gene annotations); the file is "
        "damaged or was written by a faulty tool; write it again (e.g. anndata's write_h5ad)"
    )


def test_the_assumptions_are_logged(tmp_path, caplog, medians_tsv):
    """Versioned Ensembl ids lose their version, and a missing n_counts is each cell's sum over the file's genes."""
    from .cases import COUNTS, GENES

    versioned = [f"{g}.{i + 3}" for i, g in enumerate(GENES[:3])] + GENES[3:]
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, versioned)
    assert run_gfw("vocab", medians_tsv, "-o", tmp_path / "vocab")[0] == 0
    caplog.set_level(logging.INFO, logger="geneformer_workflow")
    args = ["--token-dictionary", tmp_path / "vocab", "--gene-medians", medians_tsv]
    assert run_gfw("tokenize", h5ad, tmp_path / "corpus.parquet", *args)[0] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"3 of 4 gene ids are versioned Ensembl ids (e.g. {GENES[0]}.3)" in m for m in messages), messages
    notes = [m for m in messages if "obs has no 'n_counts'" in m]
    assert len(notes) == 1, messages  # once per file, not per chunk
    assert notes[0].startswith(f"{h5ad}: ") and "sum over the file's 4 genes" in notes[0]
    assert pq.read_table(tmp_path / "corpus.parquet").num_rows == 3  # the versioned genes became tokens
