"""Which cells of a file are kept: ``obs["filter_pass"]``, an optional QC table, and non-empty totals."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from geneformer_workflow._io import H5adCounts, InputError

_TRUTH = {"1": True, "0": False, "true": True, "false": False, "1.0": True, "0.0": False}


def load_cell_filter(path: str | Path, reader: H5adCounts) -> np.ndarray:
    """Read a QC table (``cell_id``, ``filter_pass``) written by ``gfw qc`` for ``reader``'s file."""
    with open(path, newline="") as fh:
        rows = csv.reader(fh, delimiter="\t")
        header = next(rows, [])
        missing = {"cell_id", "filter_pass"} - set(header)
        if missing:
            msg = f"{path}: QC table lacks columns {sorted(missing)}"
            raise InputError(msg)
        cell, verdict = header.index("cell_id"), header.index("filter_pass")
        table = [(row[cell], row[verdict]) for row in rows if row]
    if len(table) != reader.n_obs or [c for c, _ in table] != reader.cell_ids.tolist():
        msg = f"{path}: QC table does not list the cells of {reader.path} in order; re-run QC on that file"
        raise InputError(msg)
    passed = [_TRUTH.get(v.strip().lower()) for _, v in table]
    if None in passed:
        bad = table[passed.index(None)]
        msg = f"{path}: filter_pass of cell {bad[0]!r} is {bad[1]!r}, expected 1 or 0"
        raise InputError(msg)
    return np.array(passed, dtype=bool)


def cells_to_keep(reader: H5adCounts, qc_pass: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the cells to use: ``filter_pass == 1`` (when present) and the QC verdict."""
    keep = np.ones(reader.n_obs, dtype=bool)
    if "filter_pass" in reader.obs_columns:
        keep &= reader.obs_column("filter_pass").to_numpy() == 1
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
