"""``gfw evaluate`` end to end on a real annotated file and a real tiny exported model, and its refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from geneformer_workflow.cli import main
from geneformer_workflow.evaluate.embed import MEAN_KEY, embed_corpus
from geneformer_workflow.evaluate.run import TABLE_COLUMNS
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad
from geneformer_workflow.tokenize.vocab import load_token_dictionary

from .conftest import CELL_TYPES, TinyRun, write_annotated


def _outputs(tmp_path: Path) -> dict[str, Path]:
    return {
        name: tmp_path / f"out.{suffix}"
        for name, suffix in (("scores", "tsv"), ("embeddings", "h5ad"), ("table", "html"), ("umap", "png"))
    }


def _evaluate(h5ad: Path, outputs: dict[str, Path], *extra: str) -> int:
    argv = ["evaluate", str(h5ad), "--label-key", "cell_type"]
    for name, path in outputs.items():
        argv += [f"--{name}", str(path)]
    return main([*argv, *extra])


def test_models_and_baselines_are_scored_on_the_same_cells(tiny_run: TinyRun, tmp_path: Path, capsys):
    outputs = _outputs(tmp_path)
    model = ["--model", "tiny", str(tiny_run.model_dir)]
    rc = _evaluate(tiny_run.h5ad, outputs, *model, "--random-weights", "tiny", "--pca", "--batch-key", "batch")
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(outputs["scores"], sep="\t")
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["model"]) == ["tiny", "tiny (random weights)", "PCA"]
    assert list(table["kind"]) == ["pretrained", "random weights", "PCA"]
    assert (table["n_cells"] == 90).all() and (table["n_classes"] == len(CELL_TYPES)).all()
    assert list(table["dimensions"]) == [32, 32, 50]
    scores = table.drop(columns=["model", "kind", "n_cells", "n_classes", "dimensions", "n_clusters"])
    assert scores.notna().all().all()  # batch_asw too: batches were given
    # The marker-gene structure is strong: the standard PCA baseline separates the three types.
    pca = table.set_index("model").loc["PCA"]
    assert pca["knn_accuracy"] > 0.95 and pca["leiden_ari"] > 0.8
    adata = ad.read_h5ad(outputs["embeddings"])
    assert adata.n_obs == 90 and set(adata.obs.columns) == {"cell_type", "batch"}
    assert sorted(adata.uns["evaluation"]["models"].values()) == sorted(table["model"])
    assert "tiny" in outputs["table"].read_text() and outputs["umap"].read_bytes()[:4] == b"\x89PNG"
    # The pretrained model's vectors are exactly what tokenize + gfw embed give.
    tokens = load_token_dictionary(tiny_run.model_dir / "token_dictionary.json")
    medians = pickle.loads((tiny_run.model_dir / "gene_median_dictionary.pkl").read_bytes())
    tokenize_h5ad(
        tiny_run.h5ad,
        tmp_path / "c.parquet",
        token_dictionary=tokens,
        gene_medians=medians,
        preset=PRESETS["v1"],
        validation_fraction=0.0,
    )
    reference = embed_corpus(tiny_run.model_dir, [tmp_path / "c.parquet"])
    np.testing.assert_allclose(adata.obsm["X_tiny"], reference[adata.obs_names].obsm[MEAN_KEY], rtol=1e-5, atol=1e-6)
    # Random weights: the same architecture, other vectors.
    assert adata.obsm["X_tiny__random_weights"].shape == adata.obsm["X_tiny"].shape
    assert not np.allclose(adata.obsm["X_tiny__random_weights"], adata.obsm["X_tiny"])


def test_a_rerun_gives_the_same_table_and_an_existing_output_is_refused(tiny_run: TinyRun, tmp_path: Path, capsys):
    outputs = {"scores": tmp_path / "s.tsv"}
    args = ("--model", "tiny", str(tiny_run.model_dir), "--random-weights", "tiny")
    assert _evaluate(tiny_run.h5ad, outputs, *args) == 0
    first = outputs["scores"].read_text()
    assert _evaluate(tiny_run.h5ad, outputs, *args) == 2
    assert "already exists" in capsys.readouterr().err
    assert _evaluate(tiny_run.h5ad, outputs, *args, "--overwrite") == 0
    assert outputs["scores"].read_text() == first  # seeded: random weights, folds, graph and Leiden


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("gfw evaluate: error: ")
    return err[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"cell_type": None}, "obs has no column 'cell_type' (label_key)"),
        ({"cell_type": "T cell"}, "has one class ('T cell')"),
        ({"batch": None}, "obs has no column 'batch' (batch_key)"),
    ],
)
def test_bad_labels_are_one_line_and_no_output(tmp_path: Path, capsys, tiny_run: TinyRun, change, expected):
    h5ad = write_annotated(tmp_path / "bad.h5ad", **change)
    outputs = _outputs(tmp_path)
    rc = _evaluate(h5ad, outputs, "--batch-key", "batch", "--model", "tiny", str(tiny_run.model_dir), "--pca")
    assert rc == 2
    line = _one_error_line(capsys)
    assert str(h5ad) in line and expected in line
    assert not any(p.exists() for p in outputs.values())


def test_fewer_cells_than_folds_is_refused(tmp_path: Path, capsys):
    h5ad = write_annotated(tmp_path / "four.h5ad", n_cells=4)
    outputs = _outputs(tmp_path)
    assert _evaluate(h5ad, outputs, "--pca") == 2
    line = _one_error_line(capsys)
    assert "4 labelled cells" in line and "5-fold" in line and "evaluate.n_folds" in line
    assert not any(p.exists() for p in outputs.values())


def test_a_checkpoint_with_another_vocabulary_is_refused(tiny_run: TinyRun, tmp_path: Path, capsys):
    tokens = json.loads((tiny_run.model_dir / "token_dictionary.json").read_text())
    tokens["ENSG99999999999"] = len(tokens)  # one token more than the model's embedding has
    wrong = tmp_path / "token_dictionary.json"
    wrong.write_text(json.dumps(tokens))
    outputs = _outputs(tmp_path)
    model = ["--model", "gf", str(tiny_run.model_dir)]
    dictionaries = ["--dictionaries", "gf", str(wrong), str(tiny_run.model_dir / "gene_median_dictionary.pkl")]
    assert _evaluate(tiny_run.h5ad, outputs, *model, *dictionaries, "--pca") == 2
    line = _one_error_line(capsys)
    assert f"has a vocabulary of {len(tokens) - 1} tokens" in line and f"{wrong} has {len(tokens)}" in line
    assert not any(p.exists() for p in outputs.values())


def test_a_checkpoint_without_dictionaries_is_refused(tiny_run: TinyRun, tmp_path: Path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):  # what a public checkpoint directory holds
        (bare / name).write_bytes((tiny_run.model_dir / name).read_bytes())
    assert _evaluate(tiny_run.h5ad, _outputs(tmp_path), "--model", "gf", str(bare)) == 2
    line = _one_error_line(capsys)
    assert "token dictionary not found" in line and "evaluate.checkpoints" in line


def test_a_checkpoint_is_tokenized_with_its_own_dictionaries(tiny_run: TinyRun, tmp_path: Path, capsys):
    """Geneformer-style pickles passed by path give the same vectors as the directory's own JSON files."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_run.model_dir / name).read_bytes())
    pickles = [
        str(tiny_run.vocab_dir / "token_dictionary.pkl"),
        str(tiny_run.vocab_dir / "gene_median_dictionary.pkl"),
    ]
    outputs = {"scores": tmp_path / "s.tsv", "embeddings": tmp_path / "e.h5ad"}
    args = ["--model", "ours", str(tiny_run.model_dir), "--model", "gf", str(bare), "--dictionaries", "gf", *pickles]
    assert _evaluate(tiny_run.h5ad, outputs, *args) == 0, capsys.readouterr().err
    adata = ad.read_h5ad(outputs["embeddings"])
    np.testing.assert_array_equal(adata.obsm["X_gf"], adata.obsm["X_ours"])
    assert list(pd.read_csv(outputs["scores"], sep="\t")["kind"]) == ["pretrained", "checkpoint"]
