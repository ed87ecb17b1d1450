"""Which cells of a file are kept: ``obs["filter_pass"]``, an optional QC table, and non-empty totals."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from geneformer_workflow.tokenize._h5frame import ColumnParts
from geneformer_workflow.tokenize.h5ad import H5adCounts, InputError

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
        keep &= filter_pass(reader)
    if qc_pass is not None:
        keep &= qc_pass
    return keep


def filter_pass(reader: H5adCounts) -> np.ndarray:
    """``obs["filter_pass"]`` as booleans: 1/0, ``True``/``False``, or those as text ("1", "True", ...).

    Any other value (2, a missing value, "yes") is an :class:`InputError` naming the cell: upstream
    Geneformer would silently drop such cells, and text "1" would drop them all.
    """
    parts = reader.obs_column("filter_pass")
    if parts.kind == "categorical":  # the verdicts of the few categories, then looked up by code
        labels = np.asarray(parts.categories)
        verdicts, known = _verdicts(labels)
        codes = parts.values
        valid = codes >= 0
        valid[valid] = known[codes[valid]]
        return _checked(reader, parts, valid, verdicts.take(codes, mode="clip"))
    values = parts.values
    if values.dtype.kind in "biuf":
        valid = (values == 0) | (values == 1)
        if parts.mask is not None:
            valid &= ~parts.mask
        return _checked(reader, parts, valid, values == 1)
    labels, codes = np.unique(values.astype(str), return_inverse=True)
    verdicts, known = _verdicts(labels)
    valid = known[codes]
    if parts.mask is not None:
        valid &= ~parts.mask
    return _checked(reader, parts, valid, verdicts[codes])


def _verdicts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The verdict of each label (``"1"``, ``True``, ``"false"``, ...) and whether it is one of the known ones."""
    found = [_TRUTH.get(str(label).strip().lower()) for label in labels.tolist()]
    return np.array([bool(v) for v in found], dtype=bool), np.array([v is not None for v in found], dtype=bool)


def _checked(reader: H5adCounts, parts: ColumnParts, valid: np.ndarray, verdicts: np.ndarray) -> np.ndarray:
    if not valid.all():
        i = int(np.flatnonzero(~valid)[0])
        value = parts.to_numpy()[i]
        value = value.item() if isinstance(value, np.generic) else value
        msg = (
            f"{reader.path}: obs['filter_pass'] of cell {reader.cell_ids[i]!r} is {value!r}, expected 1 or 0 "
            "(True or False: 1 keeps the cell); fix or drop the column"
        )
        raise InputError(msg)
    return verdicts


def require_some_cells(reader: H5adCounts, keep: np.ndarray) -> None:
    """Refuse a file whose filters leave no cell."""
    if not keep.any():
        msg = (
            f"{reader.path}: all {reader.n_obs} cells are filtered out (obs filter_pass / QC thresholds); "
            "relax the QC settings or check filter_pass"
        )
        raise InputError(msg)
