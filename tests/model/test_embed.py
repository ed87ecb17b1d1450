"""``gfw embed``: cell embeddings from an exported model equal mean-pooled ``transformers.BertModel`` states."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from geneformer_workflow.cli import main
from geneformer_workflow.model import GeneformerForMaskedLM, save_hf_directory

ATOL = 1e-5
LENGTHS = [12, 5, 16, 3, 9, 7, 14]  # unsorted, so batching by length reorders the cells internally


def _export(model: GeneformerForMaskedLM, tmp_path: Path, specials: list[str]) -> Path:
    """Export ``model`` with a token dictionary of ``specials`` + gene tokens filling its vocabulary."""
    n_genes = model.config.vocab_size - len(specials)
    tokens = {token: i for i, token in enumerate(specials + [f"ENSG{i:011d}" for i in range(n_genes)])}
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "token_dictionary.json").write_text(json.dumps(tokens))
    return save_hf_directory(model, tmp_path / "export", vocab_dir=vocab)


def _corpus(tmp_path: Path, *, n_specials: int, with_cls: bool) -> tuple[Path, list[list[int]]]:
    """A corpus of len(LENGTHS) cells of distinct gene tokens (``<cls>`` … ``<eos>`` around them when asked)."""
    gen = np.random.default_rng(0)
    cells = []
    for length in LENGTHS:
        n_genes = length - 2 if with_cls else length
        genes = gen.choice(np.arange(n_specials, 40), size=n_genes, replace=False).tolist()
        cells.append([2, *genes, 3] if with_cls else genes)
    table = pa.table(
        {
            "input_ids": pa.array(cells, type=pa.list_(pa.int32())),
            "length": pa.array([len(c) for c in cells], type=pa.int32()),
            "cell_id": [f"cell{i}" for i in range(len(cells))],
            "split": ["train", "validation"] * 3 + ["train"],
            "cell_type": [f"type{i % 3}" for i in range(len(cells))],
        }
    )
    path = tmp_path / "corpus.parquet"
    pq.write_table(table, path)
    return path, cells


def _reference(export: Path, cells: list[list[int]], *, layer: int, n_specials: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, unpadded: HF ``BertModel`` hidden states of ``layer``, mean over gene tokens, and position 0."""
    bert = transformers.BertModel.from_pretrained(export, add_pooling_layer=False).eval()
    means, firsts = [], []
    with torch.no_grad():
        for ids in cells:
            states = bert(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]  # (T, H)
            genes = torch.tensor(ids) >= n_specials
            means.append(states[genes].mean(dim=0).numpy())
            firsts.append(states[0].numpy())
    return np.stack(means), np.stack(firsts)


@pytest.mark.parametrize("layer", [-1, 1, 0])
def test_gfw_embed_equals_mean_pooled_hf_bert_hidden_states(random_model, tmp_path, layer):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, cells = _corpus(tmp_path, n_specials=2, with_cls=False)
    out = tmp_path / "cells.h5ad"
    argv = ["embed", "--model", str(export), str(corpus), "-o", str(out), "--layer", str(layer), "--batch-size", "3"]
    assert main(argv) == 0
    adata = ad.read_h5ad(out)
    expected, _ = _reference(export, cells, layer=layer, n_specials=2)
    np.testing.assert_allclose(adata.obsm["X_geneformer_mean"], expected, atol=ATOL, rtol=0)
    assert "X_geneformer_cls" not in adata.obsm
    assert list(adata.obs_names) == [f"cell{i}" for i in range(len(cells))]
    assert list(adata.obs["length"]) == LENGTHS
    assert list(adata.obs["cell_type"].astype(str)) == [f"type{i % 3}" for i in range(len(cells))]
    assert set(adata.obs["split"].astype(str)) == {"train", "validation"}
    assert adata.uns["geneformer_embedding"]["layer"] == layer


def test_gfw_embed_with_cls_vocabulary_writes_cls_and_excludes_specials_from_the_mean(random_model, tmp_path):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>", "<cls>", "<eos>"])
    corpus, cells = _corpus(tmp_path, n_specials=4, with_cls=True)
    out = tmp_path / "cells.h5ad"
    assert main(["embed", "--model", str(export), str(corpus), "-o", str(out), "--batch-size", "2"]) == 0
    adata = ad.read_h5ad(out)
    expected_mean, expected_cls = _reference(export, cells, layer=-1, n_specials=4)
    np.testing.assert_allclose(adata.obsm["X_geneformer_mean"], expected_mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(adata.obsm["X_geneformer_cls"], expected_cls, atol=ATOL, rtol=0)


def test_embeddings_do_not_depend_on_batch_size_or_file_split(random_model, tmp_path):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, _ = _corpus(tmp_path, n_specials=2, with_cls=False)
    table = pq.read_table(corpus)
    parts = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(table.slice(0, 3), parts[0])
    pq.write_table(table.slice(3), parts[1])
    one = tmp_path / "one.h5ad"
    two = tmp_path / "two.h5ad"
    assert main(["embed", "--model", str(export), str(corpus), "-o", str(one), "--batch-size", "7"]) == 0
    argv = [
        "embed",
        "--model",
        str(export),
        *map(str, parts),
        "-o",
        str(two),
        "--batch-size",
        "1",
        "--chunk-cells",
        "2",
    ]
    assert main(argv) == 0
    a, b = ad.read_h5ad(one), ad.read_h5ad(two)
    np.testing.assert_allclose(a.obsm["X_geneformer_mean"], b.obsm["X_geneformer_mean"], atol=ATOL, rtol=0)
    assert list(a.obs_names) == list(b.obs_names)
    assert sorted(set(b.obs["corpus_file"].astype(str))) == sorted(map(str, parts))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer": "3"}, "--layer 3 is out of range"),
        ({"token": 99}, "token ids outside 0..39"),
        ({"no_dictionary": True}, "pass --token-dictionary"),
    ],
    ids=["layer", "token-id", "no-dictionary"],
)
def test_gfw_embed_errors_name_the_problem_and_the_fix(random_model, tmp_path, capsys, change, message):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, cells = _corpus(tmp_path, n_specials=2, with_cls=False)
    if "token" in change:
        cells[0][0] = change["token"]
        table = pq.read_table(corpus).set_column(0, "input_ids", pa.array(cells, type=pa.list_(pa.int32())))
        pq.write_table(table, corpus)
    if "no_dictionary" in change:
        (export / "token_dictionary.json").unlink()
    argv = ["embed", "--model", str(export), str(corpus), "-o", str(tmp_path / "x.h5ad")]
    assert main([*argv, "--layer", change.get("layer", "-1")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()
