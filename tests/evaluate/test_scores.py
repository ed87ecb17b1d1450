"""The scores tell a structured embedding from noise, and a mixed batch from a separated one."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from geneformer_workflow.evaluate import Labels, ScoreSettings, score_embedding

N_PER_CLASS = 40
CLASSES = ("a", "b", "c", "d")


def _labels(batch: np.ndarray | None = None) -> Labels:
    cell_type = pd.Series(np.repeat(CLASSES, N_PER_CLASS), index=[f"c{i}" for i in range(N_PER_CLASS * 4)])
    return Labels(cell_type, None if batch is None else pd.Series(batch, index=cell_type.index))


def _clustered(separation: float, seed: int = 0) -> np.ndarray:
    """Four Gaussian blobs in 10 dimensions, ``separation`` apart (0 = pure noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CLASSES), 10)) * separation
    return np.repeat(centres, N_PER_CLASS, axis=0) + rng.normal(size=(N_PER_CLASS * len(CLASSES), 10))


def test_separated_cell_types_score_high_and_noise_scores_at_chance():
    labels = _labels()
    good = score_embedding(_clustered(8.0), labels)
    noise = score_embedding(_clustered(0.0), labels)
    for key in ("knn_accuracy", "knn_macro_f1", "probe_accuracy", "probe_macro_f1"):
        assert good[key] > 0.97, (key, good[key])
        assert noise[key] < 0.45, (key, noise[key])  # chance is 0.25 with four equal classes
    assert good["leiden_ari"] > 0.9 and good["leiden_nmi"] > 0.9
    assert abs(noise["leiden_ari"]) < 0.1
    assert good["label_silhouette"] > 0.5 and abs(noise["label_silhouette"]) < 0.1
    assert good["n_clusters"] >= len(CLASSES)
    assert math.isnan(good["batch_asw"])  # no batches given


def test_batch_asw_is_high_for_mixed_batches_and_low_for_separated_ones():
    x = _clustered(8.0)
    batch = np.tile(["run1", "run2"], N_PER_CLASS * 2)
    mixed = score_embedding(x, _labels(batch))["batch_asw"]
    shifted = x + np.where(batch == "run2", 6.0, 0.0)[:, None]  # every cell type split by batch
    separated = score_embedding(shifted, _labels(batch))["batch_asw"]
    assert mixed > 0.9
    assert separated < 0.6
    assert 0.0 <= separated <= 1.0


def test_scores_are_reproducible_with_a_seed_and_change_with_the_folds():
    x, labels = _clustered(1.0), _labels()
    first = score_embedding(x, labels, ScoreSettings(seed=3))
    again = score_embedding(x, labels, ScoreSettings(seed=3))
    assert pd.Series(again).equals(pd.Series(first))  # NaN (no batches) equals NaN here
    other = score_embedding(x, labels, ScoreSettings(seed=4))
    assert other["knn_accuracy"] != first["knn_accuracy"] or other["probe_accuracy"] != first["probe_accuracy"]


def test_a_class_smaller_than_the_folds_is_still_scored():
    x = _clustered(8.0)
    cell_type = pd.Series(np.repeat(CLASSES, N_PER_CLASS), index=[f"c{i}" for i in range(N_PER_CLASS * 4)])
    cell_type.iloc[:3] = "rare"  # 3 cells, fewer than the 5 folds
    scores = score_embedding(x, Labels(cell_type, None))
    assert 0.9 < scores["knn_accuracy"] <= 1.0


@pytest.mark.parametrize("n_neighbors", [1, 500])
def test_neighbour_counts_are_capped_by_the_cells(n_neighbors):
    scores = score_embedding(_clustered(8.0), _labels(), ScoreSettings(n_neighbors=n_neighbors))
    assert 0.0 <= scores["knn_accuracy"] <= 1.0
