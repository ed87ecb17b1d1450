"""Fixtures of the evaluation tests: a small annotated raw-count file and a tiny exported model of its genes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig, save_hf_directory
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.testing import write_counts_h5ad
from geneformer_workflow.tokenize.medians import summarize_h5ad, write_medians_tsv
from geneformer_workflow.tokenize.vocab import build_token_dictionary, write_vocab_dir

N_GENES = 60
CELL_TYPES = ("T cell", "B cell", "monocyte")
MARKERS_PER_TYPE = 12


def annotated_counts(n_cells: int = 90, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Raw counts where each cell type expresses its own block of marker genes highly; two batches."""
    rng = np.random.default_rng(seed)
    cell_type = np.array([CELL_TYPES[i % len(CELL_TYPES)] for i in range(n_cells)])
    rate = np.full((n_cells, N_GENES), 0.8)
    for t, name in enumerate(CELL_TYPES):
        rate[np.ix_(cell_type == name, range(t * MARKERS_PER_TYPE, (t + 1) * MARKERS_PER_TYPE))] = 9.0
    counts = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"cell_type": cell_type, "batch": [f"run{i % 2}" for i in range(n_cells)]})
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    return counts, obs, genes


@dataclass(frozen=True)
class TinyRun:
    h5ad: Path
    model_dir: Path
    vocab_dir: Path


def write_annotated(path: Path, n_cells: int = 90, **obs_changes: object) -> Path:
    counts, obs, genes = annotated_counts(n_cells)
    for key, value in obs_changes.items():
        if value is None:
            obs = obs.drop(columns=key)
        else:
            obs[key] = value
    return write_counts_h5ad(path, counts, genes, obs=obs, cell_ids=[f"c{i}" for i in range(n_cells)])


def export_tiny_model(h5ad: Path, out: Path, *, seed: int = 1) -> TinyRun:
    """Medians and a v1 vocabulary of ``h5ad``'s genes, and a tiny seeded model exported with them."""
    out.mkdir(parents=True, exist_ok=True)
    medians = summarize_h5ad(h5ad).medians()
    write_medians_tsv(medians, out / "gene_medians.tsv")
    table = dict(zip(medians["ensembl_id"], medians["median"], strict=True))
    tokens = build_token_dictionary(table, PRESETS["v1"])
    vocab_dir = write_vocab_dir(tokens, out / "vocab", max_length=2048, gene_medians=table)
    config = ModelConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = GeneformerForMaskedLM(config)
    return TinyRun(h5ad, save_hf_directory(model, out / "export", vocab_dir=vocab_dir), vocab_dir)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny_run")
    return export_tiny_model(write_annotated(root / "annotated.h5ad"), root)
