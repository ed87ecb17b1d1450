"""``gfw embed``: cell embeddings from an exported model equal an independent ``transformers`` computation.

Two references, both from ``transformers.BertForMaskedLM``/``BertModel`` loaded from the exported directory:

- ``_emb_extractor_reference`` redoes Geneformer ``EmbExtractor``'s arithmetic: ``hidden_states[L + emb_layer]``
  of a padded batch, mean over the first ``length`` positions, or for a ``<cls>`` vocabulary over positions
  ``1 .. length - 2`` (``emb_extractor.get_embs``: ``embs_i[:, 1:, :]`` averaged over ``length - 2``);
- ``_hidden_state_reference`` takes any ``hidden_states`` index, one unpadded cell at a time, and averages the
  positions whose token is not a special token.
"""

from __future__ import annotations

import dataclasses
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
from geneformer_workflow.evaluate.embed import LayerSelection
from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig, save_hf_directory

from ..tokenize.tokenized_dataset import write_tokenized_dataset

ATOL = 1e-5
LENGTHS = [12, 5, 16, 3, 9, 7, 14]  # unsorted, so batching by length reorders the cells internally


def _export(model: GeneformerForMaskedLM, tmp_path: Path, specials: list[str]) -> Path:
    """Export ``model`` with a token dictionary of ``specials`` + gene tokens filling its vocabulary."""
    n_genes = model.config.vocab_size - len(specials)
    tokens = {token: i for i, token in enumerate(specials + [f"ENSG{i:011d}" for i in range(n_genes)])}
    return _export_with(model, tmp_path, tokens)


def _export_with(model: GeneformerForMaskedLM, tmp_path: Path, tokens: dict[str, int]) -> Path:
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


def _emb_extractor_reference(
    export: Path, cells: list[list[int]], *, emb_layer: int, with_cls: bool, batch_size: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Geneformer ``EmbExtractor`` (emb_mode "cell" and "cls") redone on ``transformers.BertForMaskedLM``."""
    model = transformers.BertForMaskedLM.from_pretrained(export, output_hidden_states=True).eval()
    layer_to_quant = model.config.num_hidden_layers + emb_layer  # quant_layers(model) + emb_layer
    means, firsts = [], []
    for start in range(0, len(cells), batch_size):
        batch = cells[start : start + batch_size]
        lengths = torch.tensor([len(c) for c in batch])
        ids = torch.zeros((len(batch), int(lengths.max())), dtype=torch.long)  # right-padded with <pad> = 0
        for i, cell in enumerate(batch):
            ids[i, : len(cell)] = torch.tensor(cell)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=mask).hidden_states[layer_to_quant]  # (B, T, H)
        firsts.append(states[:, 0].numpy())
        if with_cls:  # EmbExtractor: drop <cls> (position 0) and average length - 2 positions (no <eos>)
            states, lengths = states[:, 1:], lengths - 2
        keep = (torch.arange(states.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        means.append(((states * keep).sum(dim=1) / lengths[:, None]).numpy())
    return np.concatenate(means), np.concatenate(firsts)


def _hidden_state_reference(export: Path, cells: list[list[int]], *, index: int, n_specials: int) -> np.ndarray:
    """Per cell, unpadded: ``BertModel`` ``hidden_states[index]``, mean over the gene tokens."""
    bert = transformers.BertModel.from_pretrained(export, add_pooling_layer=False).eval()
    means = []
    with torch.no_grad():
        for ids in cells:
            states = bert(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[index][0]  # (T, H)
            means.append(states[torch.tensor(ids) >= n_specials].mean(dim=0).numpy())
    return np.stack(means)


def _embed(export: Path, corpus: list[Path] | Path, out: Path, *options: str) -> ad.AnnData:
    files = [corpus] if isinstance(corpus, Path) else corpus
    assert main(["embed", "--model", str(export), *map(str, files), "-o", str(out), *options]) == 0
    return ad.read_h5ad(out)


def test_default_layer_is_emb_extractors_default_the_second_to_last(random_model, tmp_path):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, cells = _corpus(tmp_path, n_specials=2, with_cls=False)
    adata = _embed(export, corpus, tmp_path / "cells.h5ad", "--batch-size", "2")
    expected, _ = _emb_extractor_reference(export, cells, emb_layer=-1, with_cls=False)
    np.testing.assert_allclose(adata.obsm["X_geneformer_mean"], expected, atol=ATOL, rtol=0)
    last, _ = _emb_extractor_reference(export, cells, emb_layer=0, with_cls=False)
    assert np.abs(adata.obsm["X_geneformer_mean"] - last).max() > 0.1  # the last layer is a different answer
    info = adata.uns["geneformer_embedding"]
    assert info["layer"] == 1 and info["num_hidden_layers"] == 2  # hidden_states[1]: after layer 1 of 2
    assert info["layer_option"] == "--geneformer-emb-layer -1"
    assert "second-to-last" in info["layer_description"] and "emb_layer=-1" in info["layer_description"]


@pytest.mark.parametrize(
    ("options", "emb_layer", "index"),
    [
        (["--geneformer-emb-layer", "-1"], -1, None),
        (["--geneformer-emb-layer", "0"], 0, None),
        (["--hidden-state", "-1"], None, -1),
        (["--hidden-state", "1"], None, 1),
        (["--hidden-state", "0"], None, 0),
    ],
    ids=["geneformer-1", "geneformer0", "hidden-1", "hidden1", "hidden0-embeddings"],
)
def test_gfw_embed_equals_mean_pooled_hf_bert_hidden_states(random_model, tmp_path, options, emb_layer, index):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, cells = _corpus(tmp_path, n_specials=2, with_cls=False)
    adata = _embed(export, corpus, tmp_path / "cells.h5ad", *options, "--batch-size", "3")
    if emb_layer is not None:
        expected, _ = _emb_extractor_reference(export, cells, emb_layer=emb_layer, with_cls=False)
    else:
        expected = _hidden_state_reference(export, cells, index=index, n_specials=2)
    np.testing.assert_allclose(adata.obsm["X_geneformer_mean"], expected, atol=ATOL, rtol=0)
    assert "X_geneformer_cls" not in adata.obsm
    assert list(adata.obs_names) == [f"cell{i}" for i in range(len(cells))]
    assert list(adata.obs["length"]) == LENGTHS
    assert list(adata.obs["cell_type"].astype(str)) == [f"type{i % 3}" for i in range(len(cells))]
    assert set(adata.obs["split"].astype(str)) == {"train", "validation"}
    assert adata.uns["geneformer_embedding"]["layer_option"] == " ".join(options)


def test_geneformer_emb_layer_0_is_hidden_state_minus_1_is_the_last_layer(random_model, tmp_path):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, _ = _corpus(tmp_path, n_specials=2, with_cls=False)
    choices = [["--geneformer-emb-layer", "0"], ["--hidden-state", "-1"], ["--hidden-state", "2"]]
    results = [
        _embed(export, corpus, tmp_path / f"{i}.h5ad", *options).obsm["X_geneformer_mean"]
        for i, options in enumerate(choices)
    ]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_gfw_embed_with_cls_vocabulary_pools_as_emb_extractor_and_writes_cls(random_model, tmp_path):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>", "<cls>", "<eos>"])
    corpus, cells = _corpus(tmp_path, n_specials=4, with_cls=True)
    adata = _embed(export, corpus, tmp_path / "cells.h5ad", "--batch-size", "2")
    expected_mean, expected_cls = _emb_extractor_reference(export, cells, emb_layer=-1, with_cls=True)
    np.testing.assert_allclose(adata.obsm["X_geneformer_mean"], expected_mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(adata.obsm["X_geneformer_cls"], expected_cls, atol=ATOL, rtol=0)
    by_id = _hidden_state_reference(export, cells, index=1, n_specials=4)  # specials left out by id, not position
    np.testing.assert_allclose(adata.obsm["X_geneformer_mean"], by_id, atol=ATOL, rtol=0)


def test_embeddings_do_not_depend_on_batch_size_or_file_split(random_model, tmp_path):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, _ = _corpus(tmp_path, n_specials=2, with_cls=False)
    table = pq.read_table(corpus)
    parts = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(table.slice(0, 3), parts[0])
    pq.write_table(table.slice(3), parts[1])
    a = _embed(export, corpus, tmp_path / "one.h5ad", "--batch-size", "7")
    b = _embed(export, parts, tmp_path / "two.h5ad", "--batch-size", "1", "--chunk-cells", "2")
    np.testing.assert_allclose(a.obsm["X_geneformer_mean"], b.obsm["X_geneformer_mean"], atol=ATOL, rtol=0)
    assert list(a.obs_names) == list(b.obs_names)
    assert sorted(set(b.obs["corpus_file"].astype(str))) == sorted(map(str, parts))


@pytest.mark.parametrize(
    ("num_layers", "selection", "index"),
    [
        (6, LayerSelection.geneformer(-1), 5),
        (6, LayerSelection.geneformer(0), 6),
        (6, LayerSelection.hidden_state(-1), 6),
        (6, LayerSelection.hidden_state(-2), 5),
        (6, LayerSelection.hidden_state(0), 0),
        (12, LayerSelection(), 11),
    ],
    ids=["gf-1", "gf0", "hs-1", "hs-2", "hs0", "default-12-layers"],
)
def test_layer_selection_maps_both_numberings_to_one_hidden_states_index(num_layers, selection, index):
    assert selection.index(num_hidden_layers=num_layers) == index


def test_layer_selection_refuses_numbers_outside_its_numbering():
    with pytest.raises(ValueError, match=r"takes emb_layer -1 .* or 0"):
        LayerSelection.geneformer(-2)
    with pytest.raises(ValueError, match="--hidden-state 7 is out of range for a model of 6 layers"):
        LayerSelection.hidden_state(7).index(num_hidden_layers=6)
    assert LayerSelection.hidden_state(-7).index(num_hidden_layers=6) == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("-1", "--hidden-state -1 (= --geneformer-emb-layer 0)"), ("3", "--hidden-state 3")],
    ids=["minus-one", "three"],
)
def test_old_layer_option_is_refused_with_the_mapping(random_model, tmp_path, capsys, value, expected):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, _ = _corpus(tmp_path, n_specials=2, with_cls=False)
    out = tmp_path / "x.h5ad"
    assert main(["embed", "--model", str(export), str(corpus), "-o", str(out), "--layer", value]) == 2
    err = capsys.readouterr().err
    assert "--layer was removed" in err and expected in err and "emb_layer, where -1 is the second-to-last" in err
    assert not out.exists()


def test_both_layer_options_at_once_are_refused(random_model, tmp_path, capsys):
    export = _export(random_model, tmp_path, ["<pad>", "<mask>"])
    corpus, _ = _corpus(tmp_path, n_specials=2, with_cls=False)
    argv = ["embed", "--model", str(export), str(corpus), "-o", str(tmp_path / "x.h5ad")]
    with pytest.raises(SystemExit) as err:
        main([*argv, "--geneformer-emb-layer", "0", "--hidden-state", "-1"])
    assert err.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--geneformer-emb-layer", "1"])  # EmbExtractor takes -1 or 0 only
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"options": ["--hidden-state", "3"]}, "--hidden-state 3 is out of range"),
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
    assert main([*argv, *change.get("options", [])]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()


# -- the corpus contract: dataset indexes, complete shards, the model's vocabulary --------------------------------


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    return write_tokenized_dataset(tmp_path_factory.mktemp("tokenized"))


@pytest.fixture
def tokenized_model(tokenized, tiny_cfg, tmp_path):
    """A random 2-layer model over the tokenized dataset's vocabulary, exported with its token dictionary."""
    cfg = dataclasses.replace(tiny_cfg, vocab_size=len(tokenized.tokens), max_position_embeddings=64)
    torch.manual_seed(0)
    return save_hf_directory(GeneformerForMaskedLM(cfg).eval(), tmp_path / "export", vocab_dir=tokenized.vocab_dir)


def test_dataset_index_reads_exactly_the_listed_shards_in_order(tokenized, tokenized_model, tmp_path):
    stale = tokenized.index.parent / "shard-0099.parquet"  # e.g. left by a run with another shard size
    stale.write_bytes(tokenized.shards[0].read_bytes())
    try:
        by_dir = _embed(tokenized_model, tokenized.index.parent, tmp_path / "dir.h5ad")
        by_index = _embed(tokenized_model, tokenized.index, tmp_path / "index.h5ad")
        by_shards = _embed(tokenized_model, tokenized.shards, tmp_path / "shards.h5ad")
    finally:
        stale.unlink()
    n_cells = json.loads(tokenized.index.read_text())["n_cells"]
    assert by_dir.n_obs == by_index.n_obs == by_shards.n_obs == n_cells
    cells = [pq.read_table(s).column("input_ids").to_pylist() for s in tokenized.shards]
    every_cell = [cell for shard in cells for cell in shard]
    expected, _ = _emb_extractor_reference(tokenized_model, every_cell, emb_layer=-1, with_cls=False)
    for adata in (by_dir, by_index, by_shards):
        np.testing.assert_allclose(adata.obsm["X_geneformer_mean"], expected, atol=ATOL, rtol=0)
        assert list(adata.obs["corpus_file"].astype(str)) == [
            str(s) for s, c in zip(tokenized.shards, cells, strict=True) for _ in c
        ]


def test_incomplete_shard_and_other_vocabulary_are_refused(tokenized, tokenized_model, tmp_path, capsys):
    copy = tmp_path / "shard-0000.parquet"
    copy.write_bytes(tokenized.shards[0].read_bytes())  # a shard without its manifest: a killed tokenize run
    out = tmp_path / "x.h5ad"
    assert main(["embed", "--model", str(tokenized_model), str(copy), "-o", str(out)]) == 2
    assert "incomplete corpus shard" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    genes = [g for g in tokenized.tokens if g.startswith("ENSG")]
    swapped = {**tokenized.tokens, genes[0]: tokenized.tokens[genes[1]], genes[1]: tokenized.tokens[genes[0]]}
    export = _export_with(GeneformerForMaskedLM(ModelConfig.from_hf_config(_config(tokenized_model))), other, swapped)
    assert main(["embed", "--model", str(export), str(tokenized.index), "-o", str(out)]) == 2
    assert "another token dictionary than the model's" in capsys.readouterr().err
    assert not out.exists()


def _config(export: Path) -> transformers.BertConfig:
    return transformers.BertConfig.from_json_file(export / "config.json")


def test_existing_output_needs_overwrite_and_an_input_is_never_an_output(tokenized, tokenized_model, tmp_path, capsys):
    out = tmp_path / "cells.h5ad"
    out.write_text("an earlier result")
    argv = ["embed", "--model", str(tokenized_model), str(tokenized.index), "-o", str(out)]
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "an earlier result"
    assert main([*argv, "--overwrite"]) == 0
    assert ad.read_h5ad(out).n_obs == json.loads(tokenized.index.read_text())["n_cells"]
    argv = ["embed", "--model", str(tokenized_model), str(tokenized.index), "-o", str(tokenized.shards[1])]
    assert main([*argv, "--overwrite"]) == 2
    assert "also an input" in capsys.readouterr().err
