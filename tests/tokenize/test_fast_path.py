"""The streaming fast path against a dense transcription of DESIGN §4, on awkward files.

Awkward: count dtypes other than float32, stored zeros, unsorted and duplicate entries within rows,
genes outside the vocabulary, a token order unrelated to the column order, exact ties, filtered and
empty cells, truncation, chunks and threads of every size. The output must not depend on any of them.
"""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from geneformer_workflow.presets import Preset
from geneformer_workflow.tokenize import _csc
from geneformer_workflow.tokenize import h5ad as _io
from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad

N_CELLS, N_GENES = 240, 400
PRESETS = [Preset("short_v1", 60, special_tokens=False), Preset("short_v2", 40, special_tokens=True)]


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    vocab = [g for g in genes if rng.random() < 0.8]  # a fifth of the file's genes are not in it
    order = rng.permutation(len(vocab))  # token ids unrelated to column order
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3} | {
        g: 4 + int(k) for g, k in zip(vocab, order, strict=True)
    }
    medians = pd.Series(rng.choice([0.5, 1.0, 2.0, 3.0, 7.5], len(vocab)), index=vocab)  # many exact ties
    dense = rng.negative_binomial(1, 0.6, (N_CELLS, N_GENES)) * (rng.random((N_CELLS, N_GENES)) < 0.3)
    dense[5] = 0  # an empty cell
    obs = pd.DataFrame(
        {"filter_pass": (rng.random(N_CELLS) > 0.1).astype(int)}, index=[f"c{i}" for i in range(N_CELLS)]
    )
    return genes, tokens, medians, dense, obs


def _awkward_csr(dense: np.ndarray, dtype: type, rng: np.random.Generator) -> sp.csr_matrix:
    """``dense`` as CSR with stored zeros, rows in random column order and some counts split in two."""
    rows, cols = np.nonzero(dense)
    values = dense[rows, cols]
    zeros = rng.random(dense.shape) < 0.02
    zr, zc = np.nonzero(zeros & (dense == 0))
    split = rng.random(values.size) < 0.1  # duplicates: part of the count in a second entry
    part = np.where(split, values // 2, 0)
    r = np.concatenate([rows, zr, rows[split]])
    c = np.concatenate([cols, zc, cols[split]])
    v = np.concatenate([values - part, np.zeros(zr.size), part[split]])
    shuffle = rng.permutation(r.size)
    r, c, v = r[shuffle], c[shuffle], v[shuffle]
    by_row = np.argsort(r, kind="stable")
    indptr = np.searchsorted(r[by_row], np.arange(dense.shape[0] + 1))
    return sp.csr_matrix((v[by_row].astype(dtype), c[by_row], indptr), shape=dense.shape)


def _expected(dense, genes, tokens, medians, obs, preset) -> dict[str, list[int]]:
    """DESIGN §4 densely: value = ((count * (1/n)) * 10000) * (1/median); desc value, asc token id."""
    n_counts = dense.sum(1).astype(np.float64)
    out = {}
    for i in range(dense.shape[0]):
        if obs["filter_pass"].iloc[i] != 1 or n_counts[i] == 0:
            continue
        cell = {}
        for j in np.flatnonzero(dense[i]):
            if genes[j] in medians.index:
                cell[tokens[genes[j]]] = ((float(dense[i, j]) * (1.0 / n_counts[i])) * 10_000.0) * (
                    1.0 / medians[genes[j]]
                )
        ranked = sorted(cell, key=lambda t: (-cell[t], t))[: preset.max_genes]
        if ranked:
            out[obs.index[i]] = [2, *ranked, 3] if preset.special_tokens else ranked
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_awkward_csr_matches_the_dense_definition(tmp_path, dtype, preset):
    rng = np.random.default_rng(1)
    genes, tokens, medians, dense, obs = _inputs()
    path = tmp_path / "in.h5ad"
    matrix = _awkward_csr(dense, dtype, rng)
    assert not matrix.has_canonical_format
    ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    expected = _expected(dense, genes, tokens, medians, obs, preset)
    for chunk_size, threads in [(2048, 1), (7, 1), (13, 4), (1, 3)]:
        out = tmp_path / f"c{chunk_size}_{threads}.parquet"
        stats = tokenize_h5ad(
            path,
            out,
            token_dictionary=tokens,
            gene_medians=medians,
            preset=preset,
            chunk_size=chunk_size,
            threads=threads,
        )
        table = pq.read_table(out).to_pydict()
        assert dict(zip(table["cell_id"], table["input_ids"], strict=True)) == expected
        assert table["cell_id"] == list(expected)  # file order
        assert stats.n_cells_empty == int(((dense.sum(1) == 0) & (obs["filter_pass"] == 1)).sum())
        assert stats.counts_total == float(dense[obs["filter_pass"].to_numpy() == 1].sum())


def test_threads_and_chunks_give_byte_identical_corpora(tmp_path):
    genes, tokens, medians, dense, obs = _inputs(seed=3)
    path = tmp_path / "in.h5ad"
    ad.AnnData(X=sp.csr_matrix(dense.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    outputs = []
    for chunk_size, threads in [(2048, 1), (16, 2), (5, 4)]:
        out = tmp_path / f"c{chunk_size}_{threads}.parquet"
        tokenize_h5ad(
            path,
            out,
            token_dictionary=tokens,
            gene_medians=medians,
            preset=PRESETS[0],
            chunk_size=chunk_size,
            threads=threads,
        )
        outputs.append(pq.read_table(out))
    assert all(t.equals(outputs[0]) for t in outputs[1:])


def test_column_indices_outside_the_matrix_are_an_input_error(tmp_path):
    genes, tokens, medians, dense, obs = _inputs()
    path = tmp_path / "in.h5ad"
    ad.AnnData(X=sp.csr_matrix(dense.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        indices = f["X/indices"]
        indices[-1] = N_GENES + 5
    with pytest.raises(ValueError, match="column indices outside"):
        tokenize_h5ad(path, tmp_path / "c.parquet", token_dictionary=tokens, gene_medians=medians, preset=PRESETS[0])


@pytest.mark.parametrize("band_bytes", [10**9, 4000], ids=["one-pass", "many-bands"])
def test_csc_streams_in_bands_to_the_same_corpus_as_csr(tmp_path, monkeypatch, band_bytes):
    monkeypatch.setattr(_csc, "BAND_BYTES", band_bytes)
    monkeypatch.setattr(_csc, "BLOCK_ENTRIES", 1000)
    genes, tokens, medians, dense, obs = _inputs(seed=5)
    matrix = _awkward_csr(dense, np.float32, np.random.default_rng(5))
    tables = []
    for name, stored in [("csr", matrix), ("csc", matrix.tocsc())]:
        path, out = tmp_path / f"{name}.h5ad", tmp_path / f"{name}.parquet"
        ad.AnnData(X=stored, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
        tokenize_h5ad(
            path, out, token_dictionary=tokens, gene_medians=medians, preset=PRESETS[0], chunk_size=16, rows=(3, 230)
        )
        tables.append(pq.read_table(out))
    assert tables[0].num_rows > 150 and tables[0].equals(tables[1])


def test_dense_rows_are_read_in_pieces_to_the_same_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "DENSE_BYTES", 3 * N_GENES * 4)  # three rows per read
    genes, tokens, medians, dense, obs = _inputs(seed=7)
    tables = []
    for name, stored in [("csr", sp.csr_matrix(dense.astype(np.float32))), ("dense", dense.astype(np.float32))]:
        path, out = tmp_path / f"{name}.h5ad", tmp_path / f"{name}.parquet"
        ad.AnnData(X=stored, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
        tokenize_h5ad(path, out, token_dictionary=tokens, gene_medians=medians, preset=PRESETS[1], chunk_size=20)
        tables.append(pq.read_table(out))
    assert tables[0].num_rows > 150 and tables[0].equals(tables[1])


@pytest.mark.parametrize("seed", range(5))
def test_special_tokens_wrapped_in_place_equal_a_fresh_array(seed):
    from geneformer_workflow.tokenize._corpus import _wrap_special

    rng = np.random.default_rng(seed)
    lengths = rng.choice([0, 1, 2, 50, 3000], size=40).astype(np.int32)
    tokens = rng.integers(4, 25_000, int(lengths.sum())).astype(np.int32)
    expected, expected_lengths = _wrap_special(tokens, lengths, 2, 3)
    buffer = np.full(2 * lengths.size + tokens.size + 7, -1, dtype=np.int32)
    buffer[2 * lengths.size : 2 * lengths.size + tokens.size] = tokens  # where the ranking leaves them
    wrapped, wrapped_lengths = _wrap_special(buffer[2 * lengths.size :], lengths, 2, 3, out=buffer)
    assert np.array_equal(wrapped, expected) and np.array_equal(wrapped_lengths, expected_lengths)
