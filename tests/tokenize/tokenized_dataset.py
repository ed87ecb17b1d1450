"""A small, real tokenized dataset (shards written by ``tokenize_h5ad`` + ``dataset.json``), for consumer tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad
from geneformer_workflow.tokenize.corpus_index import write_dataset_index
from geneformer_workflow.tokenize.medians import read_medians, summarize_h5ad, write_medians_tsv
from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad
from geneformer_workflow.tokenize.vocab import build_token_dictionary, load_token_dictionary, write_vocab_dir


@dataclass(frozen=True)
class TokenizedDataset:
    """Where the pieces are: ``index`` is ``dataset.json``, ``shards`` the files it lists, in order."""

    root: Path
    vocab_dir: Path
    index: Path
    shards: list[Path]
    tokens: dict[str, int]


def write_tokenized_dataset(
    root: Path,
    *,
    n_cells: int = 40,
    n_genes: int = 30,
    genes_per_cell: int = 12,
    shard_rows: tuple[tuple[int, int], ...] = ((0, 25), (25, 40)),
    preset: str = "v1",
    validation_fraction: float = 0.3,
    seed: int = 0,
) -> TokenizedDataset:
    """Tokenize seeded synthetic counts into shards (``rows``) of one dataset and index them, as the workflow does.

    The cells carry an obs column ``cell_type`` (kept in the corpus). About ``validation_fraction`` of them are
    validation cells (chosen by id hash).
    """
    root.mkdir(parents=True, exist_ok=True)
    counts = synthetic_counts(n_cells, n_genes, genes_per_cell=genes_per_cell, seed=seed).toarray()
    counts[:, :2] += 1  # every cell has genes, so none is dropped as empty
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    obs = pd.DataFrame({"cell_type": np.array(["T", "B", "NK"])[np.arange(n_cells) % 3]})
    h5ad = write_counts_h5ad(root / "cells.h5ad", counts, genes, obs=obs)
    write_medians_tsv(summarize_h5ad(h5ad).medians(), root / "gene_medians.tsv")
    medians = read_medians(root / "gene_medians.tsv")
    vocab_dir = write_vocab_dir(
        build_token_dictionary(medians.index, PRESETS[preset]),
        root / "vocab",
        max_length=PRESETS[preset].max_length,
    )
    tokens = load_token_dictionary(vocab_dir)
    shards = []
    for i, rows in enumerate(shard_rows):
        shard = root / "tokenized" / f"shard-{i:04d}.parquet"
        tokenize_h5ad(
            h5ad,
            shard,
            token_dictionary=tokens,
            gene_medians=medians,
            preset=PRESETS[preset],
            obs_columns=["cell_type"],
            validation_fraction=validation_fraction,
            rows=rows,
        )
        shards.append(shard)
    index = root / "tokenized" / "dataset.json"
    write_dataset_index(shards, index)
    return TokenizedDataset(root, Path(vocab_dir), index, shards, tokens)
