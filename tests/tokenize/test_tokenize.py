from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.testing import write_counts_h5ad
from geneformer_workflow.tokenize.h5ad import InputError
from geneformer_workflow.tokenize.tokenizer import CorpusPaths, tokenize_h5ad, validation_mask
from geneformer_workflow.tokenize.vocab import build_token_dictionary

from .cases import COUNTS, EXPECTED_GENES, GENES, MEDIANS


def _expected_ids(tokens: dict[str, int], preset_name: str) -> list[list[int]]:
    by_short = {f"G{i + 1}": tokens[g] for i, g in enumerate(GENES)}
    ids = [[by_short[g] for g in cell] for cell in EXPECTED_GENES]
    if PRESETS[preset_name].special_tokens:
        ids = [[tokens["<cls>"], *cell, tokens["<eos>"]] for cell in ids]
    return ids


def _tokenize(tmp_path, h5ad, preset="v1", **kwargs):
    tokens = build_token_dictionary(GENES, PRESETS[preset])
    out = tmp_path / "corpus.parquet"
    stats = tokenize_h5ad(h5ad, out, token_dictionary=tokens, gene_medians=MEDIANS, preset=PRESETS[preset], **kwargs)
    return pq.read_table(out).to_pylist(), tokens, stats


@pytest.mark.parametrize("matrix_format", ["csr", "csc", "dense"])
@pytest.mark.parametrize("where", ["X", "raw", "layers/counts"])
def test_hand_checked_tokens_for_every_layout(tmp_path, matrix_format, where):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES, matrix_format=matrix_format, where=where)
    rows, tokens, _ = _tokenize(tmp_path, h5ad, counts=where, chunk_size=2)
    assert [r["input_ids"] for r in rows] == _expected_ids(tokens, "v1")
    assert [r["length"] for r in rows] == [3, 1, 3]
    assert [r["cell_id"] for r in rows] == ["cell0", "cell1", "cell2"]


def test_v2_wraps_cells_in_cls_and_eos_and_counts_them_in_length(tmp_path):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    rows, tokens, _ = _tokenize(tmp_path, h5ad, preset="v2")
    assert [r["input_ids"] for r in rows] == _expected_ids(tokens, "v2")
    assert [r["length"] for r in rows] == [5, 3, 5]


def test_truncates_to_the_preset_length(tmp_path):
    rng = np.random.default_rng(0)
    genes = [f"ENSG{i:011d}" for i in range(3000)]
    counts = rng.integers(1, 50, size=(2, 3000)).astype(np.float32)
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, genes)
    tokens = build_token_dictionary(genes, PRESETS["v1"])
    out = tmp_path / "c.parquet"
    medians = pd.Series(1.0, index=genes)
    tokenize_h5ad(h5ad, out, token_dictionary=tokens, gene_medians=medians, preset=PRESETS["v1"])
    rows = pq.read_table(out).to_pylist()
    assert [r["length"] for r in rows] == [2048, 2048]
    # highest counts first; ties by ascending token id
    first = rows[0]["input_ids"]
    column_of = {tokens[g]: j for j, g in enumerate(genes)}
    values = counts[0][[column_of[t] for t in first]]
    assert list(values) == sorted(values, reverse=True)
    assert len(set(first)) == len(first)
    # ties (equal counts, equal medians) are ordered by ascending token id
    for i in range(len(first) - 1):
        assert values[i] > values[i + 1] or first[i] < first[i + 1]


def test_versioned_ids_duplicates_and_stored_zeros(tmp_path):
    # G1 split over two columns (one versioned) is summed; a stored zero never becomes a token.
    genes = ["ENSG00000000001.5", "ENSG00000000001", "ENSG00000000002", "ENSG00000000003", "ENSG00000000004"]
    counts = np.array([[2, 2, 4, 1, 0]], dtype=np.float32)
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, genes)
    rows, tokens, _ = _tokenize(tmp_path, h5ad)
    assert rows[0]["input_ids"] == [tokens[GENES[0]], tokens[GENES[1]], tokens[GENES[2]]]


def test_n_counts_from_obs_is_used_and_computed_when_missing(tmp_path):
    # With obs n_counts, only the ratio within a cell matters: same tokens either way.
    obs = pd.DataFrame({"n_counts": [100.0, 50.0, 10.0]})
    with_obs = write_counts_h5ad(tmp_path / "a.h5ad", COUNTS, GENES, obs=obs)
    without = write_counts_h5ad(tmp_path / "b.h5ad", COUNTS, GENES)
    a, _, _ = _tokenize(tmp_path / "a", with_obs)
    b, _, _ = _tokenize(tmp_path / "b", without)
    assert [r["input_ids"] for r in a] == [r["input_ids"] for r in b]


def test_filter_pass_and_empty_cells_are_dropped_and_counted(tmp_path):
    counts = np.vstack([COUNTS, np.zeros((1, 4), dtype=np.float32)])
    obs = pd.DataFrame({"filter_pass": [1, 0, 1, 1]})
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, GENES, obs=obs)
    rows, _, stats = _tokenize(tmp_path, h5ad)
    assert [r["cell_id"] for r in rows] == ["cell0", "cell2"]
    assert (stats.n_cells_filtered, stats.n_cells_empty, stats.n_cells) == (1, 1, 2)


def test_obs_columns_split_lengths_and_manifest(tmp_path):
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", "B", "T"]), "batch": [1, 2, 3]})
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES, obs=obs)
    rows, _, _ = _tokenize(tmp_path, h5ad, obs_columns=["cell_type", "batch"], validation_fraction=0.5)
    assert [r["cell_type"] for r in rows] == ["T", "B", "T"]
    assert [r["batch"] for r in rows] == [1, 2, 3]
    assert [r["split"] for r in rows] == np.where(
        validation_mask(np.array(["cell0", "cell1", "cell2"]), 0.5), "validation", "train"
    ).tolist()
    paths = CorpusPaths.beside(tmp_path / "corpus.parquet")
    assert np.load(paths.lengths_npy).tolist() == [3, 1, 3]
    with open(paths.lengths_pkl, "rb") as fh:
        assert pickle.load(fh) == [3, 1, 3]
    manifest = json.loads(paths.manifest.read_text())
    assert (manifest["n_cells"], manifest["n_tokens"], manifest["preset"]) == (3, 7, "v1")


def test_validation_split_is_deterministic_and_near_the_fraction():
    ids = np.array([f"cell{i}" for i in range(20_000)])
    mask = validation_mask(ids, 0.1)
    assert np.array_equal(mask, validation_mask(ids, 0.1))
    assert 0.09 < mask.mean() < 0.11
    assert not validation_mask(ids, 0.0).any()


def test_gene_column_order_does_not_change_tokens(tmp_path):
    perm = [2, 0, 3, 1]
    a = write_counts_h5ad(tmp_path / "a.h5ad", COUNTS, GENES)
    b = write_counts_h5ad(tmp_path / "b.h5ad", COUNTS[:, perm], [GENES[i] for i in perm])
    ra, _, _ = _tokenize(tmp_path / "a", a)
    rb, _, _ = _tokenize(tmp_path / "b", b)
    assert [r["input_ids"] for r in ra] == [r["input_ids"] for r in rb]


@pytest.mark.parametrize(
    ("counts", "problem"),
    [
        (np.log1p(COUNTS) + 0.1, "non-integer counts"),
        (COUNTS - 5, "negative counts"),
        (np.where(COUNTS > 3, np.nan, COUNTS), "NaN or infinite counts"),
    ],
    ids=["log-normalised", "negative", "nan"],
)
def test_bad_counts_are_refused_and_leave_no_output(tmp_path, counts, problem):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, GENES, matrix_format="dense")
    with pytest.raises(InputError, match=problem) as err:
        _tokenize(tmp_path, h5ad)
    assert str(h5ad) in str(err.value)
    assert list(tmp_path.glob("corpus*")) == []
    assert list(tmp_path.glob(".corpus*")) == []


def test_no_vocabulary_gene_is_an_error_naming_the_fix(tmp_path):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, ["CD3E", "CD4", "MS4A1", "LYZ"])
    with pytest.raises(InputError, match="none of its 4 gene ids is in the vocabulary"):
        _tokenize(tmp_path, h5ad)


def test_all_cells_filtered_is_an_error(tmp_path):
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES, obs=pd.DataFrame({"filter_pass": [0, 0, 0]}))
    with pytest.raises(InputError, match="all 3 cells are filtered out"):
        _tokenize(tmp_path, h5ad)


def test_gene_symbols_map_through_a_mapping(tmp_path):
    symbols = ["CD3E", "CD4", "MS4A1", "LYZ"]
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, symbols)
    mapping = dict(zip(symbols, GENES, strict=True))
    rows, tokens, _ = _tokenize(tmp_path, h5ad, gene_mapping=mapping)
    assert [r["input_ids"] for r in rows] == _expected_ids(tokens, "v1")


def test_shipped_grch38_table_maps_the_demo_symbols_back_to_its_ensembl_ids():
    import anndata as ad
    from geneformer_workflow.tokenize.genes import load_gene_mapping, map_gene_ids

    demo = ad.read_h5ad(Path(__file__).resolve().parents[2] / "resources/demo/pbmc_5k_protein_v3.h5ad", backed="r")
    symbols = demo.var["gene_symbol"].astype(str).to_numpy(dtype=object)
    mapped = map_gene_ids(symbols, load_gene_mapping("GRCh38"))
    agree = (mapped == demo.var_names.to_numpy()).mean()
    assert agree > 0.99, agree


def test_row_range_shards_concatenate_to_the_whole_file(tmp_path):
    from geneformer_workflow.testing import synthetic_counts

    counts = synthetic_counts(250, 60, genes_per_cell=20, seed=3).toarray()
    genes = [f"ENSG{i:011d}" for i in range(60)]
    obs = pd.DataFrame({"filter_pass": (np.arange(250) % 7 != 0).astype(int)})
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", counts, genes, obs=obs)
    tokens = build_token_dictionary(genes, PRESETS["v2"])
    medians = pd.Series(np.linspace(0.5, 3, 60), index=genes)
    kwargs = {"token_dictionary": tokens, "gene_medians": medians, "preset": PRESETS["v2"], "chunk_size": 32}
    tokenize_h5ad(h5ad, tmp_path / "whole.parquet", **kwargs)
    parts = [
        tokenize_h5ad(h5ad, tmp_path / f"s{i}.parquet", rows=(lo, hi), **kwargs)
        for i, (lo, hi) in enumerate([(0, 100), (100, 101), (101, 250)])
    ]
    whole = pq.read_table(tmp_path / "whole.parquet")
    joined = pa.concat_tables([pq.read_table(tmp_path / f"s{i}.parquet") for i in range(3)])
    assert joined.equals(whole)
    assert sum(p.n_cells for p in parts) == whole.num_rows
    assert [p.n_cells_input for p in parts] == [100, 1, 149]
    with pytest.raises(InputError, match="outside the file's 250 cells"):
        tokenize_h5ad(h5ad, tmp_path / "bad.parquet", rows=(200, 300), **kwargs)


@pytest.mark.parametrize(
    ("encoding", "expected", "compression"),
    [("dictionary", "RLE_DICTIONARY", "UNCOMPRESSED"), ("byte_stream_split", "BYTE_STREAM_SPLIT", "ZSTD")],
)
def test_token_lists_are_written_with_the_chosen_encoding(tmp_path, encoding, expected, compression):
    """The token column's encoding (a silently ignored option would change the cost or the readers)."""
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES)
    _tokenize(tmp_path, h5ad, parquet_encoding=encoding)
    column = pq.ParquetFile(tmp_path / "corpus.parquet").metadata.row_group(0).column(0)
    assert column.path_in_schema == "input_ids.list.element"
    assert expected in column.encodings
    assert (column.compression, column.statistics) == (compression, None)
