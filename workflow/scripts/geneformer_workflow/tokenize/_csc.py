"""Rows of a CSC-stored count matrix in bounded memory: bands of rows, one pass over the columns per band.

CSC has no row access, so each band scans every column once and keeps the entries whose row falls in
the band; the band is then converted to CSR. A band holds about ``BAND_BYTES`` of entries and the scan
reads ``BLOCK_ENTRIES`` at a time, so memory does not grow with the file; a matrix that fits in one
band is read once, a larger one once per band.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h5py
import numpy as np

from geneformer_workflow.tokenize._chunk_checks import MatrixDefect, readable_dtype

if TYPE_CHECKING:
    import scipy.sparse as sp

log = logging.getLogger(__name__)

BAND_BYTES = 96 << 20  # a band's entries in the file's dtypes (held twice while converted to CSR)
BLOCK_ENTRIES = 4_000_000  # entries read at once during a scan


def csc_row_bands(
    node: h5py.Group, shape: tuple[int, int], start: int, stop: int, chunk_size: int
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(first_row, band)``: rows ``start:stop`` as CSR bands of whole ``chunk_size``-row chunks."""
    column_ptr = node["indptr"][:].astype(np.int64)  # n_vars + 1 values: small
    if (column_ptr[1:] < column_ptr[:-1]).any():  # its first and last values were checked when the file was opened
        msg = f"indptr decreases at column {int(np.flatnonzero(column_ptr[1:] < column_ptr[:-1])[0])}"
        raise MatrixDefect(msg)
    per_row = max(int(column_ptr[-1]) / max(shape[0], 1), 1.0)
    band_entries = BAND_BYTES / (node["data"].dtype.itemsize + node["indices"].dtype.itemsize)
    band_rows = max(1, int(band_entries / per_row) // chunk_size) * chunk_size
    n_bands = -(-(stop - start) // band_rows)
    if n_bands > 1:
        log.info(
            "counts are stored as CSC: reading them in %d passes of %d rows (CSR is read once)", n_bands, band_rows
        )
    for first in range(start, stop, band_rows):
        yield first, _band(node, column_ptr, shape, first, min(stop, first + band_rows), check=first == start)


def _band(
    node: h5py.Group, column_ptr: np.ndarray, shape: tuple[int, int], first: int, last: int, *, check: bool
) -> sp.csr_matrix:
    """Rows ``first:last`` as CSR (duplicates and column order as stored); ``check``: refuse bad row indices."""
    import scipy.sparse as sp  # imported here: it costs a quarter of a second, and CSR files never need it

    n_rows, n_vars = shape
    rows, data, per_column = [], [], np.zeros(n_vars, dtype=np.int64)
    for c0, c1 in _column_blocks(column_ptr):
        lo, hi = int(column_ptr[c0]), int(column_ptr[c1])
        block_rows = node["indices"][lo:hi]
        if check and block_rows.size and (block_rows.min() < 0 or block_rows.max() >= n_rows):
            msg = f"row indices outside its {n_rows} cells (columns {c0}:{c1})"
            raise MatrixDefect(msg)
        block_rows -= first  # rows of the band become 0..last-first-1, the others wrap around as unsigned
        kept = np.flatnonzero(block_rows.view(np.uint32 if block_rows.itemsize == 4 else np.uint64) < last - first)
        rows.append(block_rows[kept])
        data.append(node["data"][lo:hi][kept].astype(readable_dtype(node["data"].dtype), copy=False))
        per_column[c0:c1] = np.diff(np.searchsorted(kept, column_ptr[c0 : c1 + 1] - lo))
    indptr = np.concatenate(([0], np.cumsum(per_column)))
    rows, data = np.concatenate(rows), np.concatenate(data)  # the parts are freed here
    return sp.csc_matrix((data, rows, indptr), shape=(last - first, n_vars)).tocsr()


def _column_blocks(column_ptr: np.ndarray) -> list[tuple[int, int]]:
    """Column ranges of about ``BLOCK_ENTRIES`` entries (a longer column is a range of its own)."""
    targets = np.arange(BLOCK_ENTRIES, int(column_ptr[-1]), BLOCK_ENTRIES)
    bounds = np.unique(
        np.concatenate(([0], np.searchsorted(column_ptr, targets, side="right") - 1, [column_ptr.size - 1]))
    )
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
