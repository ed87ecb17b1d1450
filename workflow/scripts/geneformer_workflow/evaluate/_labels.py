"""The cell labels (and batches) of an annotated evaluation dataset, checked before any embedding work."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class EvaluationInputError(ValueError):
    """A problem with an evaluation input that the user can fix; the message is one line naming file and fix."""


@dataclass(frozen=True)
class Labels:
    """Per-cell labels (and batches) of an evaluation dataset, indexed by obs name.

    Attributes:
        cell_type: The label of every labelled cell (cells whose label is missing are left out).
        batch: The batch of the same cells, or None without a batch key.
    """

    cell_type: pd.Series
    batch: pd.Series | None

    @property
    def n_classes(self) -> int:
        """Number of distinct labels."""
        return int(self.cell_type.nunique())


def read_labels(path: str | Path, *, label_key: str, batch_key: str | None = None, n_folds: int = 5) -> Labels:
    """Read and check the labels of ``path`` (only ``obs`` is read).

    Raises:
        EvaluationInputError: no such file, a missing label or batch column, a label column with fewer than two
            classes, non-unique cell names, or fewer labelled cells than ``n_folds`` (or no class with that many).
    """
    obs = _read_obs(Path(path))
    for key, option in ((label_key, "label_key"), (batch_key, "batch_key")):
        if key is not None and key not in obs.columns:
            msg = f"{path}: obs has no column {key!r} ({option}); its columns are {sorted(map(str, obs.columns))}"
            raise EvaluationInputError(msg)
    if obs.index.has_duplicates:
        example = obs.index[obs.index.duplicated()][0]
        msg = f"{path}: obs names are not unique (e.g. {example!r}); make them unique (adata.obs_names_make_unique())"
        raise EvaluationInputError(msg)
    cell_type = obs[label_key].astype(object)
    missing = cell_type.isna()
    if missing.any():
        log.warning("%s: %d cells have no %r label and are left out", path, int(missing.sum()), label_key)
    cell_type = cell_type[~missing].astype(str)
    classes = cell_type.value_counts()
    if len(classes) < 2:
        found = f"one class ({classes.index[0]!r})" if len(classes) else "no labelled cell"
        msg = f"{path}: obs[{label_key!r}] has {found}; cell-type scores need at least two classes"
        raise EvaluationInputError(msg)
    if len(cell_type) < n_folds or classes.max() < n_folds:
        msg = (
            f"{path}: {len(cell_type)} labelled cells (largest class {int(classes.max())}) are too few for "
            f"{n_folds}-fold cross-validation; lower evaluate.n_folds (--n-folds) or add cells"
        )
        raise EvaluationInputError(msg)
    rare = classes[classes < n_folds]
    if len(rare):
        log.warning(
            "%s: %d classes have fewer cells than the %d folds (%s); they are scored in fewer folds",
            path,
            len(rare),
            n_folds,
            ", ".join(f"{name}: {count}" for name, count in rare.items()),
        )
    batch = obs.loc[cell_type.index, batch_key].astype(str) if batch_key is not None else None
    return Labels(cell_type=cell_type, batch=batch)


def _read_obs(path: Path) -> pd.DataFrame:
    import h5py

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    if not path.is_file():
        msg = f"{path}: evaluation dataset not found" + (" (it is a directory)" if path.is_dir() else "")
        raise EvaluationInputError(msg)
    try:
        with h5py.File(path, "r") as h5:
            obs = read_elem(h5["obs"])
    except (OSError, KeyError) as err:
        msg = f"{path}: cannot read the obs of this .h5ad ({err})"
        raise EvaluationInputError(msg) from err
    obs.index = obs.index.astype(str)
    return obs


def align(labels: Labels, cell_ids: np.ndarray) -> Labels:
    """``labels`` restricted to (and ordered as) ``cell_ids``."""
    cell_type = labels.cell_type.reindex(cell_ids)
    batch = labels.batch.reindex(cell_ids) if labels.batch is not None else None
    return Labels(cell_type=cell_type, batch=batch)
