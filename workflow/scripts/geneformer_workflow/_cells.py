"""Which cells of a file are kept: ``obs["filter_pass"]``, an optional QC table, and non-empty totals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_workflow._io import H5adCounts, InputError


def load_cell_filter(path: str | Path, reader: H5adCounts) -> np.ndarray:
    """Read a QC table (``cell_id``, ``filter_pass``) written by ``gfw qc`` for ``reader``'s file."""
    table = pd.read_csv(path, sep="\t", dtype={"cell_id": str})
    missing = {"cell_id", "filter_pass"} - set(table.columns)
    if missing:
        msg = f"{path}: QC table lacks columns {sorted(missing)}"
        raise InputError(msg)
    if len(table) != reader.n_obs or not np.array_equal(table["cell_id"].to_numpy(), reader.obs.index.astype(str)):
        msg = f"{path}: QC table does not list the cells of {reader.path} in order; re-run QC on that file"
        raise InputError(msg)
    return table["filter_pass"].to_numpy().astype(bool)


def cells_to_keep(reader: H5adCounts, qc_pass: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the cells to use: ``filter_pass == 1`` (when present) and the QC verdict."""
    keep = np.ones(reader.n_obs, dtype=bool)
    if "filter_pass" in reader.obs.columns:
        keep &= reader.obs["filter_pass"].to_numpy() == 1
    if qc_pass is not None:
        keep &= qc_pass
    return keep


def require_some_cells(reader: H5adCounts, keep: np.ndarray) -> None:
    """Refuse a file whose filters leave no cell."""
    if not keep.any():
        msg = (
            f"{reader.path}: all {reader.n_obs} cells are filtered out (obs filter_pass / QC thresholds); "
            "relax the QC settings or check filter_pass"
        )
        raise InputError(msg)
