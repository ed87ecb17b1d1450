"""Stream raw counts out of an ``.h5ad`` file in row chunks, validating them on the way.

Only ``obs`` and the gene ids are loaded whole; the count matrix is read ``chunk_size`` rows at a time
straight from HDF5, so peak memory is bounded by the chunk, not the file (a CSC matrix, which has no
row access, is read in bands of rows: :mod:`geneformer_workflow._csc`).

Two views of a chunk: :class:`CountChunk` (float64 CSR, for QC and medians) and :class:`RawChunk`
(the file's own arrays in reused buffers, no copy or conversion: the tokenizer's fast path).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from geneformer_workflow._chunk_checks import Buffers, counts_low, is_canonical, read_ahead, to_canonical
from geneformer_workflow._csc import csc_row_bands
from geneformer_workflow._genes import count_ensembl_ids
from geneformer_workflow._h5frame import ColumnParts, column_names, read_column, read_column_parts, read_dataframe

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

log = logging.getLogger(__name__)

COUNT_SOURCES_HELP = "'X', 'raw' (raw.X) or 'layers/<name>'"
DENSE_BYTES = 64 << 20  # dense rows read at once


class InputError(ValueError):
    """A problem with a user's input file; the message names the file and the fix."""


@dataclass(frozen=True)
class CountChunk:
    """Rows ``start:stop`` of the count matrix as float64 CSR with sorted indices."""

    start: int
    stop: int
    matrix: sp.csr_matrix

    def row_sums(self) -> np.ndarray:
        """Total counts of every row (float64)."""
        return np.asarray(self.matrix.sum(axis=1), dtype=np.float64).ravel()


@dataclass(frozen=True)
class RawChunk:
    """Rows ``start:stop`` as validated CSR arrays in the file's dtypes: sorted, unique columns per row.

    ``data`` and ``indices`` may live in buffers that the next chunk overwrites: use them before
    asking for the next one. ``has_zeros``: some stored values are 0 (they must not become tokens).
    """

    start: int
    stop: int
    indptr: np.ndarray  # int64, starting at 0
    indices: np.ndarray
    data: np.ndarray
    has_zeros: bool

    def row_sums(self) -> np.ndarray:
        """Total counts of every row, in float64 (exact: the counts are integers)."""
        sums = np.zeros(self.stop - self.start, dtype=np.float64)
        nonempty = self.indptr[1:] > self.indptr[:-1]
        if not nonempty.any():
            return sums
        # reduceat over the starts of nonempty rows only: an empty row's start would yield a stray entry.
        starts = self.indptr[:-1][nonempty]
        if self.data.dtype == np.float32:
            # Sums of nonnegative integers are exact in float32 while the total stays below 2**24 (every
            # partial sum is smaller); 4x faster than converting. Larger rows are summed again in float64.
            sums[nonempty] = np.add.reduceat(self.data, starts)
            large = np.flatnonzero(sums >= 2**24)
            for row in large.tolist():
                sums[row] = self.data[self.indptr[row] : self.indptr[row + 1]].sum(dtype=np.float64)
        else:
            accumulate = np.int64 if self.data.dtype.kind in "iu" else np.float64
            sums[nonempty] = np.add.reduceat(self.data, starts, dtype=accumulate)
        return sums


class H5adCounts:
    """Row-chunked reader of the raw counts, obs and gene ids of one ``.h5ad`` file.

    The cell ids and gene ids are read when the file is opened; ``obs`` columns one at a time
    (:meth:`obs_column`), or as a whole dataframe (:attr:`obs`, which imports pandas) on first use.

    Args:
        path: the ``.h5ad`` file.
        counts: where the raw counts are: ``"X"``, ``"raw"`` or ``"layers/<name>"``.
        gene_id_key: ``var`` column holding the gene ids; ``None`` uses the ``var`` index.
    """

    def __init__(self, path: str | Path, *, counts: str = "X", gene_id_key: str | None = None) -> None:
        self.path = Path(path)
        self.counts = counts
        if not self.path.is_file():
            msg = "no such file"
            raise self._error(msg)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            msg = f"not a readable .h5ad (HDF5) file — is it truncated or corrupt? ({err})"
            raise self._error(msg) from err
        try:
            self._matrix, self._var_group = self._locate(counts)
            if _unfiltered_chunks(self._matrix):
                # HDF5 would copy every uncompressed chunk through its chunk cache; without the cache it
                # reads straight into our buffers (a third less time spent reading)
                self._file.close()
                self._file = h5py.File(self.path, "r", rdcc_nbytes=0)
                self._matrix, self._var_group = self._locate(counts)
            self._obs_group = self._file["obs"]
            self.cell_ids = _as_str(read_column(self._obs_group, None))
            self.obs_columns = column_names(self._obs_group)
            self.gene_ids = self._gene_ids(gene_id_key)
        except KeyError as err:
            self.close()
            msg = f"not a valid AnnData file (missing {err})"
            raise self._error(msg) from err
        self.n_obs, self.n_vars = self._shape()
        self._obs_n_counts: np.ndarray | None = None
        self._check_shape()

    @cached_property
    def obs(self) -> pd.DataFrame:
        """The ``obs`` dataframe (read on first use: tokenizing needs single columns alone)."""
        return read_dataframe(self._obs_group)

    def obs_column(self, key: str) -> ColumnParts:
        """One ``obs`` column, as stored (see :class:`~geneformer_workflow._h5frame.ColumnParts`)."""
        return read_column_parts(self._obs_group, key)

    @cached_property
    def var(self) -> pd.DataFrame:
        """The ``var`` dataframe of the count source (read on first use: tokenizing needs the gene ids alone)."""
        return read_dataframe(self._var_group)

    def _error(self, problem: str) -> InputError:
        """An :class:`InputError` whose message starts with this file's path."""
        return InputError(f"{self.path}: {problem}")

    # -- layout -------------------------------------------------------------------------------
    def _locate(self, counts: str) -> tuple[h5py.Group | h5py.Dataset, h5py.Group]:
        f = self._file
        if counts == "X":
            node, var = f.get("X"), f["var"]
        elif counts == "raw":
            node, var = f.get("raw/X"), f.get("raw/var")
        elif counts.startswith("layers/"):
            node, var = f.get(counts), f["var"]
        else:
            msg = f"unknown count source {counts!r}; use {COUNT_SOURCES_HELP}"
            raise self._error(msg)
        if node is None or var is None:
            msg = f"has no {counts!r} matrix; choose the raw counts with {COUNT_SOURCES_HELP}"
            raise self._error(msg)
        return node, var

    @property
    def encoding(self) -> str:
        """``csr_matrix``, ``csc_matrix`` or ``array``."""
        if isinstance(self._matrix, h5py.Dataset):
            return "array"
        enc = self._matrix.attrs.get("encoding-type", self._matrix.attrs.get("h5sparse_format", ""))
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        return {"csr": "csr_matrix", "csc": "csc_matrix"}.get(enc, enc)

    def _shape(self) -> tuple[int, int]:
        if isinstance(self._matrix, h5py.Dataset):
            shape = self._matrix.shape
        else:
            shape = tuple(int(x) for x in self._matrix.attrs["shape"])
        if len(shape) != 2:
            msg = f"the {self.counts} matrix has shape {shape}, expected cells x genes"
            raise self._error(msg)
        return int(shape[0]), int(shape[1])

    def _gene_ids(self, gene_id_key: str | None) -> np.ndarray:
        columns = column_names(self._var_group)
        if gene_id_key is not None and gene_id_key not in columns:
            msg = (
                f"var has no column {gene_id_key!r} with gene ids "
                f"(columns: {columns}); set the gene id column or use the var index"
            )
            raise self._error(msg)
        return _as_str(read_column(self._var_group, gene_id_key))

    def _check_shape(self) -> None:
        if self.n_obs == 0 or self.n_vars == 0:
            msg = f"the count matrix is empty ({self.n_obs} cells x {self.n_vars} genes)"
            raise self._error(msg)
        if len(self.cell_ids) != self.n_obs or len(self.gene_ids) != self.n_vars:
            shape = f"{self.n_obs} x {self.n_vars}"
            msg = f"matrix is {shape} but obs has {len(self.cell_ids)} rows and var {len(self.gene_ids)}"
            raise self._error(msg)
        if _mostly_gene_ids(self.cell_ids[:100]) and not _mostly_gene_ids(self.gene_ids[:100]):
            msg = (
                "obs names look like Ensembl gene ids — the matrix seems transposed (genes as rows); "
                "write it as cells x genes (adata.T)"
            )
            raise self._error(msg)
        n_unique = len(set(self.cell_ids.tolist()))
        if n_unique < self.n_obs:
            seen: set[str] = set()
            example = next(c for c in self.cell_ids.tolist() if c in seen or seen.add(c))
            msg = (
                f"{self.n_obs - n_unique} duplicate cell ids (e.g. {example!r}); cell ids name "
                "the corpus rows, so make them unique (adata.obs_names_make_unique())"
            )
            raise self._error(msg)

    # -- reading ------------------------------------------------------------------------------
    def iter_chunks(self, chunk_size: int = 2048, *, start: int = 0, stop: int | None = None) -> Iterator[CountChunk]:
        """Yield validated float64 CSR row chunks of rows ``start:stop`` of the count matrix, in order."""
        import scipy.sparse as sp

        for raw in self.iter_raw_chunks(chunk_size, start=start, stop=stop):
            matrix = sp.csr_matrix(
                (raw.data.astype(np.float64), raw.indices.copy(), raw.indptr.copy()),
                shape=(raw.stop - raw.start, self.n_vars),
            )
            if raw.has_zeros:
                matrix.eliminate_zeros()
            yield CountChunk(raw.start, raw.stop, matrix)

    def iter_raw_chunks(
        self, chunk_size: int = 2048, *, start: int = 0, stop: int | None = None, buffers: int = 1
    ) -> Iterator[RawChunk]:
        """Yield validated row chunks of rows ``start:stop`` as the file's own arrays (see :class:`RawChunk`).

        A background thread reads and checks the next chunk while the caller works on this one (h5py and
        numpy release the GIL). The arrays of a chunk stay valid until the caller has asked for ``buffers``
        more chunks (a ring of buffers).
        """
        if chunk_size < 1:
            msg = f"chunk_size must be >= 1, got {chunk_size}"
            raise ValueError(msg)
        if self.encoding not in ("csr_matrix", "csc_matrix", "array"):
            msg = f"unsupported matrix encoding {self.encoding!r} for {self.counts}"
            raise self._error(msg)
        end = self.n_obs if stop is None else stop
        # one buffer set more than the caller holds: the chunk being read ahead
        yield from read_ahead(self._checked_chunks(chunk_size, start, end, buffers + 1))

    def _checked_chunks(self, chunk_size: int, start: int, stop: int, buffers: int) -> Iterator[RawChunk]:
        scratch = Buffers()  # temporaries of the checks
        for lo, hi, (indptr, indices, data) in self._chunk_arrays(chunk_size, start, stop, buffers):
            canonical = data.dtype.kind in "fiu" and is_canonical(indptr, indices, scratch)
            self._check_columns(indptr, indices, lo, canonical=canonical)
            if not canonical:
                indptr, indices, data = to_canonical(indptr, indices, data, self.n_vars)
            has_zeros = self._validate_counts(data, indptr, lo, scratch)
            yield RawChunk(lo, hi, indptr, indices, data, has_zeros=has_zeros)

    def _chunk_arrays(
        self, chunk_size: int, start: int, stop: int, buffers: int
    ) -> Iterator[tuple[int, int, tuple[np.ndarray, ...]]]:
        """``(lo, hi, (indptr, indices, data))`` of every chunk, as stored (CSR rows from any encoding)."""
        if self.encoding == "csc_matrix":
            for first, band in csc_row_bands(self._matrix, (self.n_obs, self.n_vars), start, stop, chunk_size):
                band_ptr = band.indptr.astype(np.int64)
                for lo in range(first, first + band.shape[0], chunk_size):
                    hi = min(lo + chunk_size, first + band.shape[0])
                    indptr = band_ptr[lo - first : hi - first + 1]
                    a, b = int(indptr[0]), int(indptr[-1])
                    # copies, so that no chunk keeps the band alive while the next one is read
                    yield lo, hi, (indptr - a, band.indices[a:b].copy(), band.data[a:b].copy())
                del band
            return
        ring = [Buffers() for _ in range(max(1, buffers))]  # the chunks' arrays
        for i, lo in enumerate(range(start, stop, chunk_size)):
            hi = min(lo + chunk_size, stop)
            if self.encoding == "csr_matrix":
                yield lo, hi, self._read_csr_rows(lo, hi, ring[i % len(ring)])
            else:
                rows = self._read_dense_rows(lo, hi)
                yield lo, hi, (rows.indptr.astype(np.int64), rows.indices, rows.data)

    def _read_csr_rows(self, start: int, stop: int, buffers: Buffers) -> tuple[np.ndarray, ...]:
        """Rows ``start:stop`` of a CSR matrix, read into reused buffers (no allocation, no page faults)."""
        node = self._matrix
        indptr = node["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        indptr -= lo
        indices = buffers.get("indices", node["indices"].dtype, hi - lo)
        data = buffers.get("data", node["data"].dtype, hi - lo)
        if hi > lo:
            node["indices"].read_direct(indices, np.s_[lo:hi])
            node["data"].read_direct(data, np.s_[lo:hi])
        return indptr, indices, data

    def _read_dense_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` of a dense matrix as CSR, read ``DENSE_BYTES`` at a time (a wide matrix is big)."""
        import scipy.sparse as sp

        step = max(1, DENSE_BYTES // (self.n_vars * self._matrix.dtype.itemsize))
        parts = [sp.csr_matrix(self._matrix[a : min(a + step, stop)]) for a in range(start, stop, step)]
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def _check_columns(self, indptr: np.ndarray, indices: np.ndarray, start: int, *, canonical: bool) -> None:
        """Column indices must lie in ``0..n_vars-1`` (in canonical rows, the first and last entries tell)."""
        if canonical:
            nonempty = indptr[1:] > indptr[:-1]
            first, last = indices[indptr[:-1][nonempty]], indices[indptr[1:][nonempty] - 1]
        else:
            first = last = indices
        if first.size and (first.min() < 0 or last.max() >= self.n_vars):
            msg = f"{self.counts} has column indices outside its {self.n_vars} genes (rows from {start})"
            raise self._error(msg)

    def _validate_counts(self, data: np.ndarray, indptr: np.ndarray, start: int, buffers: Buffers) -> bool:
        """Refuse non-count values (naming a cell); return whether some stored values are 0."""
        if not data.size:
            return False
        counts, low = counts_low(data, buffers)
        if counts:
            return low == 0
        bad = ~np.isfinite(data)
        problem = "NaN or infinite counts"
        if not bad.any():
            bad = data < 0
            problem = "negative counts"
        if not bad.any():
            bad = data != np.floor(data)
            problem = "non-integer counts"
        first = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(indptr, first, side="right") - 1)
        cell = self.cell_ids[start + row]
        msg = (
            f"{self.counts} holds {problem} (e.g. {data[first]:g} in cell {cell!r}); Geneformer tokenization "
            "needs raw integer counts — this looks like normalised, log-transformed or scaled data. "
            f"Point the count source at the raw counts ({COUNT_SOURCES_HELP})"
        )
        raise self._error(msg)

    def n_counts(self, chunk: CountChunk | RawChunk, *, row_sums: np.ndarray | None = None) -> np.ndarray:
        """Total counts per cell over ALL genes: ``obs["n_counts"]`` when present, else the row sums.

        A given ``n_counts`` must be finite and at least the cell's counts in the file (it also counts
        genes the file may lack), else the values would be wrong: that is an error naming the cell.
        """
        row_sums = chunk.row_sums() if row_sums is None else row_sums
        if "n_counts" not in self.obs_columns:
            return row_sums
        if self._obs_n_counts is None:
            self._obs_n_counts = self.obs_column("n_counts").to_numpy().astype(np.float64)
        n_counts = self._obs_n_counts[chunk.start : chunk.stop]
        bad = ~np.isfinite(n_counts) | (n_counts < row_sums * (1 - 1e-6))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            msg = (
                f"obs['n_counts'] is inconsistent with the counts: cell {self.cell_ids[chunk.start + i]!r} has "
                f"n_counts {n_counts[i]:g} but {row_sums[i]:g} counts in the matrix; n_counts must be the total "
                "over all genes of the raw counts (drop the column to have it computed)"
            )
            raise self._error(msg)
        return n_counts

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __enter__(self) -> H5adCounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unfiltered_chunks(node: h5py.Group | h5py.Dataset) -> bool:
    """Whether the count matrix is stored in chunks without compression or other filters."""
    datasets = [node] if isinstance(node, h5py.Dataset) else [node.get("data"), node.get("indices")]
    return all(
        isinstance(d, h5py.Dataset) and d.chunks is not None and d.id.get_create_plist().get_nfilters() == 0
        for d in datasets
    )


def _as_str(values: np.ndarray) -> np.ndarray:
    """An object array of ``str`` (ids stored as numbers or bytes become text)."""
    if values.dtype == object and all(type(v) is str for v in values.tolist()):
        return values
    return np.array([str(v) for v in values.tolist()], dtype=object)


def _mostly_gene_ids(ids: np.ndarray) -> bool:
    """Whether more than half of ``ids`` look like Ensembl gene ids."""
    return count_ensembl_ids(ids.tolist()) > len(ids) / 2


def count_cells(path: str | Path, counts: str = "X") -> int:
    """Number of cells of an ``.h5ad`` file, read from the matrix header only (cheap)."""
    with h5py.File(path, "r") as f:
        node = f["raw/X" if counts == "raw" else counts]
        shape = node.shape if isinstance(node, h5py.Dataset) else node.attrs["shape"]
        return int(shape[0])
