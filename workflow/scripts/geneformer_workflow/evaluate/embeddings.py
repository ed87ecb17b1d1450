"""Cell embeddings of an annotated ``.h5ad`` from each model that is evaluated.

* A Geneformer model directory (ours or a public Hugging Face one): the file is tokenized with the model's own
  token dictionary and gene medians (``geneformer_workflow.tokenize.tokenizer``) into a temporary corpus, then
  embedded by
  ``geneformer_workflow.evaluate.embed`` (mean over gene tokens of the chosen layer, as ``gfw embed``).
* The same architecture with random weights (``random_weights``): the model's config with a fresh, seeded
  initialisation (``GeneformerForMaskedLM._init_weights``), tokenized and embedded the same way. The gap between
  a model and its random twin is what pretraining added.
* PCA of log-normalised highly variable genes, scanpy's standard path: ``normalize_total`` (10,000 counts per
  cell), ``log1p``, ``highly_variable_genes`` (``flavor="seurat"``), ``scale`` (clipped at 10), ``pca``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..tokenize.vocab import GENEFORMER_GENE_MEDIANS, GENEFORMER_TOKEN_DICTIONARY, TOKEN_DICTIONARY
from ._labels import EvaluationInputError
from .embed import MEAN_KEY, EmbeddingSettings, embed_corpus

log = logging.getLogger(__name__)

__all__ = ["CountsSource", "ModelSpec", "embed_with_model", "pca_embedding", "resolve_dictionaries"]

TOKEN_DICTIONARY_NAMES = (TOKEN_DICTIONARY, GENEFORMER_TOKEN_DICTIONARY)
GENE_MEDIANS_NAMES = (GENEFORMER_GENE_MEDIANS, "gene_medians.tsv")
PRETRAINED, CHECKPOINT, RANDOM, PCA = "pretrained", "checkpoint", "random weights", "PCA"
DEFAULT_EMBEDDING = EmbeddingSettings()  # gfw embed's defaults


@dataclass(frozen=True)
class CountsSource:
    """Where the raw counts and gene ids of the evaluation file are (as for ``gfw tokenize``)."""

    counts: str = "X"
    gene_id_key: str | None = None
    gene_mapping: dict[str, str] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class ModelSpec:
    """One Geneformer model to evaluate.

    Attributes:
        name: Its row name in the table.
        model_dir: A Hugging Face ``BertForMaskedLM`` directory.
        token_dictionary: Its token dictionary; default: the directory's ``token_dictionary.json`` (or ``.pkl``).
        gene_medians: Its gene medians; default: the directory's ``gene_median_dictionary.pkl``.
        kind: ``pretrained`` (this run's model), ``checkpoint`` (a user's) or ``random weights``.
    """

    name: str
    model_dir: Path
    token_dictionary: Path | None = None
    gene_medians: Path | None = None
    kind: str = PRETRAINED

    def random_twin(self) -> ModelSpec:
        """The same architecture and vocabulary with random weights."""
        return ModelSpec(
            f"{self.name} (random weights)", self.model_dir, self.token_dictionary, self.gene_medians, RANDOM
        )


def resolve_dictionaries(spec: ModelSpec) -> tuple[Path, Path]:
    """The token dictionary and gene medians of ``spec``, checked against its model's vocabulary size.

    Raises:
        EvaluationInputError: a missing model, dictionary or median file, or a dictionary whose size differs from
            the model's vocabulary (``config.json`` ``vocab_size``).
    """
    config = spec.model_dir / "config.json"
    if not config.is_file():
        msg = f"{spec.model_dir}: model {spec.name!r} has no config.json; expected a Hugging Face model directory"
        raise EvaluationInputError(msg)
    tokens_path = spec.token_dictionary or _first_file(spec.model_dir, TOKEN_DICTIONARY_NAMES)
    medians_path = spec.gene_medians or _first_file(spec.model_dir, GENE_MEDIANS_NAMES)
    for path, what, names in (
        (tokens_path, "token dictionary", TOKEN_DICTIONARY_NAMES),
        (medians_path, "gene medians", GENE_MEDIANS_NAMES),
    ):
        if path is None or not Path(path).is_file():
            where = path if path is not None else f"{spec.model_dir} (none of {list(names)})"
            msg = (
                f"model {spec.name!r}: {what} not found: {where}; a public checkpoint needs the dictionaries it was "
                "trained with (evaluate.checkpoints: token_dictionary, gene_medians)"
            )
            raise EvaluationInputError(msg)
    from ..tokenize.vocab import load_token_dictionary

    n_tokens = len(load_token_dictionary(tokens_path))
    vocab_size = int(json.loads(config.read_text())["vocab_size"])
    if n_tokens != vocab_size:
        msg = (
            f"model {spec.name!r}: {spec.model_dir} has a vocabulary of {vocab_size:,} tokens but the token "
            f"dictionary {tokens_path} has {n_tokens:,}; pass the dictionary the model was trained with"
        )
        raise EvaluationInputError(msg)
    return Path(tokens_path), Path(medians_path)


def _first_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def embed_with_model(
    spec: ModelSpec,
    h5ad: str | Path,
    workdir: Path,
    *,
    source: CountsSource = CountsSource(),
    settings: EmbeddingSettings = DEFAULT_EMBEDDING,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``h5ad`` with ``spec``'s dictionaries and embed its cells.

    Args:
        workdir: An empty scratch directory (the corpus and, for random weights, the model go there).

    Returns:
        (cell ids, embeddings): the cells the tokenizer kept (cells without any vocabulary gene are dropped) and
        their mean embeddings, (cells, hidden) float32.
    """
    from ..presets import PRESETS
    from ..tokenize.median_table import read_gene_medians
    from ..tokenize.tokenizer import tokenize_h5ad
    from ..tokenize.vocab import has_special_tokens, load_token_dictionary

    tokens_path, medians_path = resolve_dictionaries(spec)
    tokens = load_token_dictionary(tokens_path)
    preset = PRESETS["v2" if has_special_tokens(tokens) else "v1"]
    corpus = workdir / "cells.parquet"
    stats = tokenize_h5ad(
        h5ad,
        corpus,
        token_dictionary=tokens,
        gene_medians=read_gene_medians(medians_path),
        preset=preset,
        counts=source.counts,
        gene_id_key=source.gene_id_key,
        gene_mapping=source.gene_mapping,
        validation_fraction=0.0,
        overwrite=False,
    )
    log.info(
        "%s: %d cells tokenized (preset %s, %d of %d genes in the vocabulary)",
        spec.name,
        stats.n_cells,
        preset.name,
        stats.genes_matched,
        stats.genes_in_file,
    )
    model_dir = (
        _random_model(spec.model_dir, workdir / "random_model", seed) if spec.kind == RANDOM else spec.model_dir
    )
    adata = embed_corpus(model_dir, [corpus], settings=settings, token_dictionary=tokens_path)
    return adata.obs_names.to_numpy(dtype=str), np.asarray(adata.obsm[MEAN_KEY], dtype=np.float32)


def _random_model(model_dir: Path, out: Path, seed: int) -> Path:
    """``model_dir``'s architecture with a seeded fresh initialisation, saved as a model directory."""
    import torch
    from transformers import BertConfig

    from ..model import GeneformerForMaskedLM, ModelConfig, save_hf_directory

    config = ModelConfig.from_hf_config(BertConfig.from_json_file(model_dir / "config.json"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GeneformerForMaskedLM(config)
    return save_hf_directory(model, out)


def pca_embedding(
    h5ad: str | Path, *, counts: str = "X", n_top_genes: int = 2000, n_comps: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """PCA of log-normalised highly variable genes (scanpy's standard path); (cell ids, (cells, n_comps)).

    The whole count matrix is read into memory: evaluation files are meant to be small (thousands of cells).
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    adata = _counts_anndata(ad.read_h5ad(h5ad), counts, h5ad)
    sc.pp.filter_genes(adata, min_cells=1)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(n_top_genes, adata.n_vars), flavor="seurat")
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    adata.X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    sc.pp.scale(adata, max_value=10)
    n_comps = max(1, min(n_comps, adata.n_obs - 1, adata.n_vars - 1))
    sc.pp.pca(adata, n_comps=n_comps, svd_solver="arpack", random_state=seed)
    log.info("PCA: %d highly variable genes, %d components", adata.n_vars, n_comps)
    return adata.obs_names.to_numpy(dtype=str), np.asarray(adata.obsm["X_pca"], dtype=np.float32)


def _counts_anndata(adata: object, counts: str, path: str | Path) -> object:
    """An AnnData of the raw counts in ``X`` (float32), from ``X``, ``raw`` or ``layers/<name>``."""
    import anndata as ad
    import scipy.sparse as sp

    if counts == "X":
        matrix = adata.X
    elif counts == "raw":
        if adata.raw is None:
            msg = f"{path}: --counts raw, but the file has no raw"
            raise EvaluationInputError(msg)
        matrix = adata.raw.X
    elif counts.startswith("layers/") and counts.split("/", 1)[1] in adata.layers:
        matrix = adata.layers[counts.split("/", 1)[1]]
    else:
        msg = f"{path}: no count matrix at {counts!r}; use X, raw or layers/<name> (layers: {list(adata.layers)})"
        raise EvaluationInputError(msg)
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    return ad.AnnData(X=matrix, obs=adata.obs[[]].copy())
