"""Evaluate models on one annotated dataset: embed with each, score each on the same cells, write the outputs.

Every input is checked (labels, batches, folds, each model's files and vocabulary) before the first cell is
embedded, and the outputs (scores TSV, and optionally the embeddings ``.h5ad``, the HTML table and the UMAP
figure) appear together or not at all, so a failure never leaves a partial table.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._labels import EvaluationInputError, Labels, align, read_labels
from .embed import EmbeddingSettings
from .embeddings import (
    DEFAULT_EMBEDDING,
    PCA,
    CountsSource,
    ModelSpec,
    embed_with_model,
    pca_embedding,
    resolve_dictionaries,
)
from .scores import DEFAULT_SCORES, SCORE_COLUMNS, ScoreSettings, majority_fraction, neighbour_graph, score_embedding

log = logging.getLogger(__name__)

__all__ = ["EvaluationOutputs", "EvaluationPlan", "evaluate_dataset"]

TABLE_COLUMNS = ("model", "kind", "n_cells", "n_classes", "dimensions", "majority_fraction", *SCORE_COLUMNS)


@dataclass(frozen=True)
class EvaluationPlan:
    """What to evaluate on one annotated file.

    Attributes:
        h5ad: The annotated raw-count file.
        label_key: obs column with the cell types.
        batch_key: obs column with the batches (adds ``batch_asw``), or None.
        models: Geneformer models (this run's, users' checkpoints, random-weight twins), in table order.
        pca: Whether to add the PCA baseline (after the models).
        source: Where the counts and gene ids are in ``h5ad``.
    """

    h5ad: Path
    label_key: str
    batch_key: str | None = None
    models: tuple[ModelSpec, ...] = ()
    pca: bool = True
    source: CountsSource = field(default_factory=CountsSource)


@dataclass(frozen=True)
class EvaluationOutputs:
    """Files to write; all but ``scores`` are optional."""

    scores: Path
    embeddings: Path | None = None
    table: Path | None = None
    umap: Path | None = None

    def paths(self) -> list[Path]:
        """The outputs to write, the scores TSV last (it marks a complete set)."""
        return [p for p in (self.embeddings, self.table, self.umap) if p is not None] + [self.scores]


def evaluate_dataset(
    plan: EvaluationPlan,
    outputs: EvaluationOutputs,
    *,
    scores: ScoreSettings = DEFAULT_SCORES,
    embedding: EmbeddingSettings = DEFAULT_EMBEDDING,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Embed ``plan.h5ad`` with every model, score each, and write ``outputs``; returns the table.

    Raises:
        EvaluationInputError: a bad label or batch column, too few cells, a model without matching dictionaries.
        OutputError: an output exists (without ``overwrite``), is a directory or is an input.
    """
    from ..atomic import atomic_files, check_outputs

    if not plan.models and not plan.pca:
        msg = "nothing to evaluate: give at least one model (--model) or --pca"
        raise EvaluationInputError(msg)
    names = [m.name for m in plan.models] + ([PCA] if plan.pca else [])
    if len(set(names)) != len(names):
        msg = f"model names must differ: {names}"
        raise EvaluationInputError(msg)
    inputs = [plan.h5ad, *(m.model_dir for m in plan.models)]
    check_outputs(outputs.paths(), inputs=inputs, overwrite=overwrite)
    labels = read_labels(plan.h5ad, label_key=plan.label_key, batch_key=plan.batch_key, n_folds=scores.n_folds)
    for spec in plan.models:
        resolve_dictionaries(spec)  # every model's files and vocabulary, before the first (slow) embedding
    embedded = _embed_all(plan, embedding, scores.seed)
    cells = _common_cells(embedded, labels, plan.h5ad)
    aligned = align(labels, cells)
    if len(cells) < scores.n_folds or aligned.n_classes < 2:
        msg = f"{plan.h5ad}: only {len(cells)} labelled cells were embedded by every model; too few to score"
        raise EvaluationInputError(msg)
    vectors = {name: _rows(ids, x, cells) for name, (ids, x) in embedded.items()}
    kinds = {m.name: m.kind for m in plan.models} | {PCA: PCA}
    graphs = {name: neighbour_graph(x, scores) for name, x in vectors.items()}  # for Leiden and the UMAPs
    rows = [_row(name, kinds[name], x, aligned, scores, graphs[name]) for name, x in vectors.items()]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    with atomic_files(outputs.paths(), inputs=inputs, overwrite=overwrite) as tmp_paths:
        tmp = dict(zip(outputs.paths(), tmp_paths, strict=True))
        if outputs.embeddings is not None:
            _write_embeddings(tmp[outputs.embeddings], vectors, aligned, plan)
        if outputs.table is not None:
            from .report import write_scores_html

            write_scores_html(table, tmp[outputs.table], dataset=plan.h5ad, labels=aligned, settings=scores)
        if outputs.umap is not None:
            from .report import plot_label_umaps

            plot_label_umaps(graphs, aligned, tmp[outputs.umap], seed=scores.seed)
        table.to_csv(tmp[outputs.scores], sep="\t", index=False, float_format="%.6g", na_rep="NA")
    return table


def _embed_all(
    plan: EvaluationPlan, settings: EmbeddingSettings, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    embedded = {}
    with tempfile.TemporaryDirectory(prefix="gfw-evaluate-") as scratch:
        for i, spec in enumerate(plan.models):
            workdir = Path(scratch) / str(i)
            workdir.mkdir()
            embedded[spec.name] = embed_with_model(
                spec, plan.h5ad, workdir, source=plan.source, settings=settings, seed=seed
            )
            log.info("%s: embedded %d cells", spec.name, len(embedded[spec.name][0]))
    if plan.pca:
        embedded[PCA] = pca_embedding(plan.h5ad, counts=plan.source.counts, seed=seed)
    return embedded


def _common_cells(embedded: dict[str, tuple[np.ndarray, np.ndarray]], labels: Labels, path: Path) -> np.ndarray:
    """Labelled cells that every model embedded, in the file's order."""
    keep = pd.Index(labels.cell_type.index)
    for name, (ids, _) in embedded.items():
        missing = keep.difference(pd.Index(ids))
        if len(missing):
            log.warning(
                "%s: %s did not embed %d labelled cells (no vocabulary gene); they are left out",
                path,
                name,
                len(missing),
            )
        keep = keep.intersection(pd.Index(ids), sort=False)
    return keep.to_numpy(dtype=str)


def _rows(ids: np.ndarray, x: np.ndarray, cells: np.ndarray) -> np.ndarray:
    position = pd.Index(ids).get_indexer(cells)
    assert (position >= 0).all(), "every common cell has an embedding row"
    return x[position]


def _row(
    name: str, kind: str, x: np.ndarray, labels: Labels, settings: ScoreSettings, graph: object
) -> dict[str, object]:
    log.info("scoring %s (%d cells x %d dimensions)", name, x.shape[0], x.shape[1])
    return {
        "model": name,
        "kind": kind,
        "n_cells": x.shape[0],
        "n_classes": labels.n_classes,
        "dimensions": x.shape[1],
        "majority_fraction": majority_fraction(labels),
        **score_embedding(x, labels, settings, graph=graph),
    }


def _write_embeddings(out: Path, vectors: dict[str, np.ndarray], labels: Labels, plan: EvaluationPlan) -> None:
    """An AnnData of the scored cells: obs = label (and batch), one obsm entry per model."""
    import anndata as ad

    obs = pd.DataFrame({plan.label_key: pd.Categorical(labels.cell_type.to_numpy())}, index=labels.cell_type.index)
    if labels.batch is not None and plan.batch_key is not None:
        obs[plan.batch_key] = pd.Categorical(labels.batch.to_numpy())
    adata = ad.AnnData(obs=obs)
    for name, x in vectors.items():
        adata.obsm[f"X_{_slug(name)}"] = x
    adata.uns["evaluation"] = {"source": str(plan.h5ad), "models": {f"X_{_slug(n)}": n for n in vectors}}
    adata.write_h5ad(out)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "model"
