"""Cell-type evaluation of cell embeddings: is the pretrained model any good?

Embed an annotated raw-count ``.h5ad`` with each model (this run's, users' Geneformer checkpoints, the same
architectures with random weights) and with a PCA baseline, and score every embedding on the same cells:
kNN and linear-probe classification, Leiden clusters against the labels, label silhouette and batch mixing
(``scores``). ``gfw evaluate`` is the command (``cli``); ``report`` draws the report's table and UMAPs.
"""

from __future__ import annotations

from ._labels import EvaluationInputError, Labels, read_labels
from .embeddings import CountsSource, ModelSpec, embed_with_model, pca_embedding
from .run import EvaluationOutputs, EvaluationPlan, evaluate_dataset
from .scores import SCORE_COLUMNS, ScoreSettings, score_embedding

__all__ = [
    "SCORE_COLUMNS",
    "CountsSource",
    "EvaluationInputError",
    "EvaluationOutputs",
    "EvaluationPlan",
    "Labels",
    "ModelSpec",
    "ScoreSettings",
    "embed_with_model",
    "evaluate_dataset",
    "pca_embedding",
    "read_labels",
    "score_embedding",
]
