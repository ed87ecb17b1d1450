from __future__ import annotations

import json
import pickle
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from .helpers import REPO, run_snakemake, snakemake_env, workflow_command, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The whole workflow on the demo data (2 tokenization shards, 2-process FSDP2 pretraining of 6 steps)."""
    workdir = tmp_path_factory.mktemp("demo")
    overrides = ["training.max_steps=6", "checkpoint.save_every=3", "logging.log_every=2", "logging.eval_every=3"]
    write_config(workdir, tokenize={"shard_cells": 120}, pretrain={"nproc_per_node": 2, "overrides": overrides})
    result = run_snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir


def test_corpus_has_every_kept_cell_with_valid_tokens(demo_run):
    shards = sorted((demo_run / "results/tokenized/pbmc_5k_protein_v3").glob("shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-0000.parquet", "shard-0001.parquet"]
    corpus = pa.concat_tables([pq.read_table(p) for p in shards])
    manifests = [json.loads(p.with_suffix("").with_suffix(".manifest.json").read_text()) for p in shards]
    vocab = json.loads((demo_run / "results/reference/vocab/token_dictionary.json").read_text())
    qc = (demo_run / "results/qc/pbmc_5k_protein_v3/cells.tsv").read_text().splitlines()
    assert corpus.num_rows == sum(m["n_cells"] for m in manifests)
    assert corpus.num_rows == len(qc) - 1 - sum(m["n_cells_filtered"] for m in manifests)
    lengths = corpus.column("length").to_numpy()
    saved = np.concatenate([np.load(p.with_suffix("").with_suffix(".lengths.npy")) for p in shards])
    assert np.array_equal(lengths, saved)
    for ids, length in zip(corpus.column("input_ids").to_pylist()[:20], lengths[:20], strict=True):
        assert len(ids) == length <= 2048
        assert len(set(ids)) == len(ids)
        assert min(ids) >= 2 and max(ids) < len(vocab)
    assert set(corpus.column("split").to_pylist()) == {"train", "validation"}


def test_pretraining_checkpoints_and_exports_a_loadable_model(demo_run):
    from transformers import AutoTokenizer, BertForMaskedLM

    final = json.loads((demo_run / "results/pretrain/sanity/final.json").read_text())
    assert final["step"] == 6
    assert np.isfinite(final["train_loss"])
    assert (demo_run / "results/pretrain/sanity" / final["checkpoint"]).is_dir()
    export = demo_run / "results/export/sanity"
    model = BertForMaskedLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    shard = demo_run / "results/tokenized/pbmc_5k_protein_v3/shard-0000.parquet"
    ids = pq.read_table(shard).column("input_ids")[0].as_py()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:64]])).logits
    assert logits.shape == (1, 64, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_rerun_has_nothing_to_do(demo_run):
    result = run_snakemake(demo_run, "-n", "--cores", "2")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_dataset_index_lists_the_shards_and_their_lengths_in_order(demo_run):
    directory = demo_run / "results/tokenized/pbmc_5k_protein_v3"
    index = json.loads((directory / "dataset.json").read_text())
    assert index["shards"] == ["shard-0000.parquet", "shard-0001.parquet"]
    lengths = np.concatenate([np.load(directory / f"shard-000{i}.lengths.npy") for i in range(2)])
    assert np.array_equal(np.load(directory / "dataset.lengths.npy"), lengths)
    assert pickle.loads((directory / "dataset.lengths.pkl").read_bytes()) == lengths.tolist()
    # the corpus list names exactly the inputs' datasets, relative to itself
    assert (demo_run / "results/tokenized/datasets.txt").read_text() == "pbmc_5k_protein_v3/dataset.json\n"
    assert (demo_run / "results/pretrain/sanity/config.yaml").is_file()  # the config the run used, for the report


def test_a_moved_copy_of_the_project_has_nothing_to_do(demo_run, tmp_path):
    """Rule params hold no machine paths (package directory, interpreter): a copied project does not rerun jobs."""
    repo = tmp_path / "moved repo"
    for part in ("workflow", "config"):
        shutil.copytree(REPO / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    workdir = tmp_path / "moved work"
    shutil.copytree(demo_run, workdir, symlinks=True)
    command = workflow_command(workdir, "-n", "--cores", "2")
    command[command.index("--snakefile") + 1] = str(repo / "workflow" / "Snakefile")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=snakemake_env(), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
