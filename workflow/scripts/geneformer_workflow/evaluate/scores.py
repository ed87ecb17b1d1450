"""Scores of one cell embedding against known cell types (and batches), with scikit-learn and scanpy.

Every score is computed on the same cells for every model, with fixed seeds, so rows of one table compare:

* ``knn_accuracy``, ``knn_macro_f1``: a k-nearest-neighbour classifier (Euclidean, ``n_neighbors``), predicted
  for each cell by a model fitted on the other folds of a stratified ``n_folds``-fold split;
* ``probe_accuracy``, ``probe_macro_f1``: the same folds with a linear probe (standardised features, then
  multinomial logistic regression);
* ``leiden_ari``, ``leiden_nmi`` (and ``n_clusters``): Leiden clusters of scanpy's ``n_neighbors`` graph at a
  fixed ``leiden_resolution`` against the labels (adjusted Rand index; normalised mutual information);
* ``label_silhouette``: the mean silhouette width of the labels, in [-1, 1] (scib reports ``(s + 1) / 2``);
* ``batch_asw`` (with batches): scib's batch silhouette, in [0, 1], 1 = batches fully mixed within each cell
  type: per cell type with at least two batches, the mean over its cells of ``1 - |s|``, ``s`` the silhouette of
  the cell's batch among the cells of that type; then the mean over those cell types (Luecken et al. 2022,
  Nat. Methods 19:41, "batch ASW"; scib ``silhouette_batch``).

Macro-F1 weighs every class equally, so a rare cell type counts as much as a common one; accuracy is dominated
by the common types. A constant guess of the largest class scores ``accuracy = its fraction`` and a low
macro-F1: compare with the ``majority_fraction`` column.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._labels import Labels

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

__all__ = ["SCORE_COLUMNS", "ScoreSettings", "neighbour_graph", "score_embedding"]

SCORE_COLUMNS = (
    "knn_accuracy",
    "knn_macro_f1",
    "probe_accuracy",
    "probe_macro_f1",
    "leiden_ari",
    "leiden_nmi",
    "n_clusters",
    "label_silhouette",
    "batch_asw",
)


@dataclass(frozen=True)
class ScoreSettings:
    """Parameters of the scores (the defaults are the workflow's).

    Attributes:
        n_folds: Folds of the stratified cross-validation of the kNN classifier and the linear probe.
        n_neighbors: Neighbours of the kNN classifier and of the Leiden graph.
        leiden_resolution: Resolution of the Leiden clustering.
        seed: Seed of the folds, the probe, the neighbour graph and Leiden.
    """

    n_folds: int = 5
    n_neighbors: int = 15
    leiden_resolution: float = 1.0
    seed: int = 0


DEFAULT_SCORES = ScoreSettings()


def score_embedding(
    embedding: np.ndarray, labels: Labels, settings: ScoreSettings = DEFAULT_SCORES, *, graph: AnnData | None = None
) -> dict[str, float]:
    """All scores of ``embedding`` (cells x dimensions, rows in the order of ``labels``).

    Args:
        graph: Its :func:`neighbour_graph` when already built (the report's UMAP reuses it); else built here.

    Returns:
        One value per name of ``SCORE_COLUMNS`` (``batch_asw`` is NaN without batches).
    """
    x = np.asarray(embedding, dtype=np.float64)
    y = labels.cell_type.to_numpy()
    if x.shape[0] != y.size:
        msg = f"{x.shape[0]} embedding rows for {y.size} labelled cells"
        raise AssertionError(msg)
    folds = _folds(y, settings)
    scores: dict[str, float] = {}
    scores.update(_classification("knn", _knn(settings, y.size), x, y, folds))
    scores.update(_classification("probe", _probe(settings), x, y, folds))
    scores.update(_leiden(graph if graph is not None else neighbour_graph(x, settings), y, settings))
    scores["label_silhouette"] = _silhouette(x, y)
    scores["batch_asw"] = _batch_asw(x, y, labels.batch.to_numpy()) if labels.batch is not None else float("nan")
    return scores


def majority_fraction(labels: Labels) -> float:
    """The accuracy of always guessing the largest class (a floor for the classification scores)."""
    return float(labels.cell_type.value_counts(normalize=True).iloc[0])


def _folds(y: np.ndarray, settings: ScoreSettings) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=settings.n_folds, shuffle=True, random_state=settings.seed)
    with warnings.catch_warnings():  # "least populated class ... fewer members": logged when labels are read
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(np.zeros((y.size, 1)), y))


def _knn(settings: ScoreSettings, n_cells: int) -> object:
    from sklearn.neighbors import KNeighborsClassifier

    smallest_train = n_cells - -(-n_cells // settings.n_folds)  # cells in the smallest training split
    return KNeighborsClassifier(n_neighbors=max(1, min(settings.n_neighbors, smallest_train)))


def _probe(settings: ScoreSettings) -> object:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=settings.seed))


def _classification(
    name: str, estimator: object, x: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, float]:
    """Accuracy and macro-F1 of the out-of-fold predictions of ``estimator``."""
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, f1_score

    predicted = np.empty(y.size, dtype=object)
    for train, test in folds:
        model = clone(estimator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a probe on a random embedding may not converge
            model.fit(x[train], y[train])
        predicted[test] = model.predict(x[test])
    return {
        f"{name}_accuracy": float(accuracy_score(y, predicted)),
        f"{name}_macro_f1": float(f1_score(y, predicted, average="macro", zero_division=0)),
    }


def neighbour_graph(embedding: np.ndarray, settings: ScoreSettings = DEFAULT_SCORES) -> AnnData:
    """An AnnData holding scanpy's ``n_neighbors`` graph of ``embedding`` (``obsm["X_emb"]``), for Leiden and UMAP."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(obsm={"X_emb": np.asarray(embedding, dtype=np.float32)})
    n_neighbors = max(2, min(settings.n_neighbors, adata.n_obs - 1))
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X_emb", random_state=settings.seed)
    return adata


def _leiden(graph: AnnData, y: np.ndarray, settings: ScoreSettings) -> dict[str, float]:
    """Leiden clusters of the kNN graph (scanpy) against the labels."""
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    adata = graph.copy()
    sc.tl.leiden(
        adata,
        resolution=settings.leiden_resolution,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=settings.seed,
    )
    clusters = adata.obs["leiden"].to_numpy()
    return {
        "leiden_ari": float(adjusted_rand_score(y, clusters)),
        "leiden_nmi": float(normalized_mutual_info_score(y, clusters)),
        "n_clusters": float(len(set(clusters))),
    }


def _silhouette(x: np.ndarray, groups: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    n_groups = len(set(groups))
    if not 2 <= n_groups <= groups.size - 1:
        return float("nan")
    return float(silhouette_score(x, groups))


def _batch_asw(x: np.ndarray, y: np.ndarray, batch: np.ndarray) -> float:
    """scib's batch ASW: per cell type, the mean of ``1 - |silhouette of the batch|``; then the mean over types."""
    from sklearn.metrics import silhouette_samples

    per_type = []
    for cell_type in sorted(set(y)):
        rows = y == cell_type
        n_batches = len(set(batch[rows]))
        if not 2 <= n_batches <= rows.sum() - 1:
            continue  # one batch only (or too few cells): mixing is undefined for this type
        per_type.append(float(np.mean(1.0 - np.abs(silhouette_samples(x[rows], batch[rows])))))
    if not per_type:
        log.warning("no cell type has cells of two batches: batch_asw is undefined (NaN)")
        return float("nan")
    return float(np.mean(per_type))
