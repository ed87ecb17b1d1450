"""Stream raw counts out of an ``.h5ad`` file in row chunks, validating them on the way.

Only ``obs`` and the gene ids are loaded whole; the count matrix is read ``chunk_size`` rows at a time
straight from HDF5, so peak memory is bounded by the chunk, not the file (a CSC matrix, which has no
row access, is read in bands of rows: :mod:`geneformer_workflow.tokenize._csc`).

Two views of a chunk: :class:`CountChunk` (float64 CSR, for QC and medians) and :class:`RawChunk`
(the file's own arrays in reused buffers, no copy or conversion: the tokenizer's fast path).

The file's layout is checked when it is opened (cheap: attributes, dataset shapes and two ``indptr``
values) and every chunk as it is read (vectorised: ``indptr`` increases, column indices in range,
values are counts), so a damaged or hand-made file ends in an :class:`InputError` naming the file and
the defect, never in a wrong corpus or another exception. Files written by anndata 0.6 and older are
read as anndata reads them (``h5sparse_format``/``h5sparse_shape`` matrices, ``raw.X``/``raw.var``,
compound-dtype ``obs``/``var``: :mod:`geneformer_workflow.tokenize._h5frame`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from geneformer_workflow.tokenize._chunk_checks import (
    Buffers,
    MatrixDefect,
    counts_low,
    is_canonical,
    read_ahead,
    readable_dtype,
    to_canonical,
)
from geneformer_workflow.tokenize._csc import csc_row_bands
from geneformer_workflow.tokenize._h5frame import (
    ColumnParts,
    column_names,
    read_column,
    read_column_parts,
    read_dataframe,
)
from geneformer_workflow.tokenize.genes import count_ensembl_ids

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

log = logging.getLogger(__name__)

COUNT_SOURCES_HELP = "'X', 'raw' (raw.X) or 'layers/<name>'"
DENSE_BYTES = 64 << 20  # dense rows read at once
REWRITE_HINT = "the file is damaged or was written by a faulty tool; write it again (e.g. anndata's write_h5ad)"


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
        self._file = _open_h5ad(self.path)
        try:
            self._matrix, self._var_group = _locate(self._file, counts, self._error)
            self.n_obs, self.n_vars = _matrix_shape(self._matrix, counts, self._error)
            if _unfiltered_chunks(self._matrix):
                # HDF5 would copy every uncompressed chunk through its chunk cache; without the cache it
                # reads straight into our buffers (a third less time spent reading)
                self._file.close()
                self._file = h5py.File(self.path, "r", rdcc_nbytes=0)
                self._matrix, self._var_group = _locate(self._file, counts, self._error)
            self._obs_group = _member(self._file, "obs")
            if self._obs_group is None:
                msg = "not a valid AnnData file (it has no obs, the cell annotations)"
                raise self._error(msg)
            self._read_names(gene_id_key)
            self._check_shape()
        except BaseException:
            self.close()
            raise
        self._obs_n_counts: np.ndarray | None = None
        self._row_sums_noted = False

    def _read_names(self, gene_id_key: str | None) -> None:
        """Cell ids, ``obs`` column names and gene ids; a frame that cannot be read is an :class:`InputError`."""
        try:
            self.cell_ids = _as_str(read_column(self._obs_group, None))
            self.obs_columns = column_names(self._obs_group)
            self.gene_ids = self._gene_ids(gene_id_key)
        except InputError:
            raise
        except KeyError as err:
            msg = f"not a valid AnnData file (missing {err})"
            raise self._error(msg) from err
        except Exception as err:  # anndata raises its own types for encodings it cannot read
            msg = f"cannot read its obs/var annotations ({type(err).__name__}: {err}); {REWRITE_HINT}"
            raise self._error(msg) from err

    @cached_property
    def obs(self) -> pd.DataFrame:
        """The ``obs`` dataframe (read on first use: tokenizing needs single columns alone)."""
        return read_dataframe(self._obs_group)

    def obs_column(self, key: str) -> ColumnParts:
        """One ``obs`` column, as stored (see :class:`~geneformer_workflow.tokenize._h5frame.ColumnParts`)."""
        return read_column_parts(self._obs_group, key)

    @cached_property
    def var(self) -> pd.DataFrame:
        """The ``var`` dataframe of the count source (read on first use: tokenizing needs the gene ids alone)."""
        return read_dataframe(self._var_group)

    def _error(self, problem: str) -> InputError:
        """An :class:`InputError` whose message starts with this file's path."""
        return InputError(f"{self.path}: {problem}")

    # -- layout -------------------------------------------------------------------------------
    @property
    def encoding(self) -> str:
        """``csr_matrix``, ``csc_matrix`` or ``array``."""
        return _encoding(self._matrix)

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
        end = self.n_obs if stop is None else stop
        # one buffer set more than the caller holds: the chunk being read ahead
        yield from read_ahead(self._checked_chunks(chunk_size, start, end, buffers + 1))

    def _checked_chunks(self, chunk_size: int, start: int, stop: int, buffers: int) -> Iterator[RawChunk]:
        scratch = Buffers()  # temporaries of the checks
        for lo, hi, (indptr, indices, data) in self._chunk_arrays(chunk_size, start, stop, buffers):
            if data.dtype == np.bool_:
                data = data.view(np.uint8)  # 0/1 counts
            canonical = data.dtype.kind in "fiu" and is_canonical(indptr, indices, scratch)
            self._check_columns(indptr, indices, lo, canonical=canonical)
            # the stored values are checked, before duplicates are summed (1 and -1 would hide in a 0)
            has_zeros = self._validate_counts(data, indptr, lo, scratch)
            if not canonical:
                indptr, indices, data = to_canonical(indptr, indices, data, self.n_vars)
            yield RawChunk(lo, hi, indptr, indices, data, has_zeros=has_zeros)

    def _chunk_arrays(
        self, chunk_size: int, start: int, stop: int, buffers: int
    ) -> Iterator[tuple[int, int, tuple[np.ndarray, ...]]]:
        """``(lo, hi, (indptr, indices, data))`` of every chunk, as stored (CSR rows from any encoding)."""
        if self.encoding == "csc_matrix":
            try:
                yield from self._csc_chunks(chunk_size, start, stop)
            except MatrixDefect as err:
                raise self._corrupt(str(err)) from err
            return
        ring = [Buffers() for _ in range(max(1, buffers))]  # the chunks' arrays
        for i, lo in enumerate(range(start, stop, chunk_size)):
            hi = min(lo + chunk_size, stop)
            if self.encoding == "csr_matrix":
                yield lo, hi, self._read_csr_rows(lo, hi, ring[i % len(ring)])
            else:
                rows = self._read_dense_rows(lo, hi)
                yield lo, hi, (rows.indptr.astype(np.int64), rows.indices, rows.data)

    def _csc_chunks(self, chunk_size: int, start: int, stop: int) -> Iterator[tuple[int, int, tuple[np.ndarray, ...]]]:
        """The chunks of a CSC matrix, cut from bands of rows (:mod:`geneformer_workflow.tokenize._csc`)."""
        for first, band in csc_row_bands(self._matrix, (self.n_obs, self.n_vars), start, stop, chunk_size):
            band_ptr = band.indptr.astype(np.int64)
            for lo in range(first, first + band.shape[0], chunk_size):
                hi = min(lo + chunk_size, first + band.shape[0])
                indptr = band_ptr[lo - first : hi - first + 1]
                a, b = int(indptr[0]), int(indptr[-1])
                # copies, so that no chunk keeps the band alive while the next one is read
                yield lo, hi, (indptr - a, band.indices[a:b].copy(), band.data[a:b].copy())
            del band

    def _read_csr_rows(self, start: int, stop: int, buffers: Buffers) -> tuple[np.ndarray, ...]:
        """Rows ``start:stop`` of a CSR matrix, read into reused buffers (no allocation, no page faults)."""
        node = self._matrix
        indptr = node["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        # Chunks overlap by one indptr value: increasing within each chunk means increasing throughout, and
        # bounded by the entries in each chunk means never reading outside them.
        if (indptr[1:] < indptr[:-1]).any():
            row = start + int(np.flatnonzero(indptr[1:] < indptr[:-1])[0])
            msg = f"indptr decreases at cell {self.cell_ids[row]!r} (row {row})"
            raise self._corrupt(msg)
        n_entries = node["data"].shape[0]
        if lo < 0 or hi > n_entries:
            msg = f"indptr holds {lo if lo < 0 else hi} (rows {start}:{stop}), outside its {n_entries} entries"
            raise self._corrupt(msg)
        indptr -= lo
        # read in native byte order, float16 as float32 (HDF5 converts while reading)
        indices = buffers.get("indices", readable_dtype(node["indices"].dtype), hi - lo)
        data = buffers.get("data", readable_dtype(node["data"].dtype), hi - lo)
        if hi > lo:
            node["indices"].read_direct(indices, np.s_[lo:hi])
            node["data"].read_direct(data, np.s_[lo:hi])
        return indptr, indices, data

    def _read_dense_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` of a dense matrix as CSR, read ``DENSE_BYTES`` at a time (a wide matrix is big)."""
        import scipy.sparse as sp

        step = max(1, DENSE_BYTES // (self.n_vars * self._matrix.dtype.itemsize))
        dtype = readable_dtype(self._matrix.dtype)  # scipy refuses float16
        parts = [
            sp.csr_matrix(self._matrix[a : min(a + step, stop)].astype(dtype, copy=False))
            for a in range(start, stop, step)
        ]
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def _check_columns(self, indptr: np.ndarray, indices: np.ndarray, start: int, *, canonical: bool) -> None:
        """Column indices must lie in ``0..n_vars-1`` (in canonical rows, the first and last entries tell)."""
        if canonical:
            nonempty = indptr[1:] > indptr[:-1]
            first, last = indices[indptr[:-1][nonempty]], indices[indptr[1:][nonempty] - 1]
        else:
            first = last = indices
        if first.size and (first.min() < 0 or last.max() >= self.n_vars):
            msg = f"column indices outside its {self.n_vars} genes (rows from {start})"
            raise self._corrupt(msg)

    def _corrupt(self, defect: str) -> InputError:
        """The error for a count matrix whose structure is broken."""
        return self._error(f"the {self.counts} matrix ({self.encoding}) is corrupt: {defect}; {REWRITE_HINT}")

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
            if not self._row_sums_noted:
                self._row_sums_noted = True
                log.info(
                    "%s: obs has no 'n_counts'; each cell's total is its sum over the file's %d genes (a file "
                    "with fewer genes than were measured, e.g. filtered to highly variable genes, gives smaller "
                    "totals than the original data, so larger normalised values)",
                    self.path,
                    self.n_vars,
                )
            return row_sums
        if self._obs_n_counts is None:
            self._obs_n_counts = self._numeric_obs("n_counts")
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

    def _numeric_obs(self, key: str) -> np.ndarray:
        """An ``obs`` column as float64 (numbers stored as text are read as numbers); other text is an error."""
        values = self.obs_column(key).to_numpy()
        try:
            return values.astype(np.float64)
        except (TypeError, ValueError):
            pass
        bad = next(i for i, v in enumerate(values.tolist()) if not _is_number(v))  # only on the error path
        msg = (
            f"obs[{key!r}] holds values that are not numbers (e.g. {values[bad]!r} in cell {self.cell_ids[bad]!r}); "
            f"{key} must be each cell's total raw count (drop the column to have it computed)"
        )
        raise self._error(msg)

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __enter__(self) -> H5adCounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_h5ad(path: Path) -> h5py.File:
    """Open an ``.h5ad`` file for reading; anything else (a directory, a zarr store, not HDF5) is an InputError."""
    if path.is_dir():
        target = f"'{path.with_suffix('.h5ad')}'" if path.suffix != ".h5ad" else "..."
        msg = (
            f"{path}: is a directory, not an .h5ad file (zarr stores are not supported; convert one with "
            f"anndata.read_zarr('{path}').write_h5ad({target}))"
        )
        raise InputError(msg)
    if not path.is_file():
        msg = f"{path}: no such file"
        raise InputError(msg)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        hint = " (zarr stores are not supported: convert with anndata.read_zarr(...).write_h5ad(...))"
        zarr = "zarr" in path.name.lower() or path.suffix == ".zip"
        msg = f"{path}: not a readable .h5ad (HDF5) file — is it truncated or corrupt?{hint if zarr else ''} ({err})"
        raise InputError(msg) from err


def _member(group: h5py.Group, name: str) -> h5py.Group | h5py.Dataset | None:
    """``group[name]``, or ``None`` when there is no such member (or a path through a non-group)."""
    try:
        node = group.get(name)
    except (KeyError, TypeError, ValueError):
        return None
    return node if isinstance(node, h5py.Group | h5py.Dataset) else None


def _locate(
    f: h5py.File, counts: str, error: Callable[[str], InputError]
) -> tuple[h5py.Group | h5py.Dataset, h5py.Group | h5py.Dataset]:
    """The count matrix named by ``counts`` and the ``var`` dataframe of its genes."""
    layer = counts.removeprefix("layers/")
    if counts == "X":
        candidates = [("X", "var")]
    elif counts == "raw":
        candidates = [("raw/X", "raw/var"), ("raw.X", "raw.var")]  # anndata < 0.7 wrote raw.X and raw.var
    elif counts.startswith("layers/") and layer and "/" not in layer:
        candidates = [(counts, "var")]
    else:
        msg = f"unknown count source {counts!r}; use {COUNT_SOURCES_HELP}"
        raise error(msg)
    for matrix_key, var_key in candidates:
        node = _member(f, matrix_key)
        if node is not None:
            var = _member(f, var_key)
            if var is None:
                msg = f"has a {matrix_key} matrix but no {var_key} (its gene annotations); {REWRITE_HINT}"
                raise error(msg)
            return node, var
    layers = _member(f, "layers")
    names = sorted(layers) if isinstance(layers, h5py.Group) else []
    listed = f" (its layers: {names})" if counts.startswith("layers/") else ""
    msg = f"has no {counts!r} matrix{listed}; choose the raw counts with {COUNT_SOURCES_HELP}"
    raise error(msg)


def _encoding(node: h5py.Group | h5py.Dataset) -> str:
    """``array``, ``csr_matrix``, ``csc_matrix`` or whatever else the matrix's attributes say."""
    if isinstance(node, h5py.Dataset):
        return "array"
    enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))  # anndata < 0.7: h5sparse_format
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    return {"csr": "csr_matrix", "csc": "csc_matrix"}.get(enc, enc)


def _matrix_shape(node: h5py.Group | h5py.Dataset, counts: str, error: Callable[[str], InputError]) -> tuple[int, int]:
    """``(n_obs, n_vars)`` of a count matrix, after checking its layout (cheap: no values are read but two)."""
    encoding = _encoding(node)

    def corrupt(defect: str) -> InputError:
        return error(f"the {counts} matrix ({encoding}) is corrupt: {defect}; {REWRITE_HINT}")

    if isinstance(node, h5py.Dataset):
        if node.ndim != 2:
            msg = f"the {counts} matrix has shape {node.shape}, expected cells x genes"
            raise error(msg)
        _check_values(node, counts, error)
        return int(node.shape[0]), int(node.shape[1])
    if encoding not in ("csr_matrix", "csc_matrix"):
        msg = (
            f"unsupported matrix encoding {encoding!r} for {counts} (expected a dense array or a CSR or CSC "
            f"sparse matrix); choose the raw counts with {COUNT_SOURCES_HELP}"
        )
        raise error(msg)
    shape = _shape_attribute(node)
    if shape is None:
        msg = f"its shape attribute is {node.attrs.get('shape', node.attrs.get('h5sparse_shape'))!r}, not 2 sizes"
        raise corrupt(msg)
    parts = {name: _member(node, name) for name in ("data", "indices", "indptr")}
    for name, part in parts.items():
        if not isinstance(part, h5py.Dataset):
            msg = f"it has no {name!r} dataset"
            raise corrupt(msg)
        if part.ndim != 1:
            msg = f"{name} has shape {part.shape}, not one dimension"
            raise corrupt(msg)
    for name in ("indices", "indptr"):
        if parts[name].dtype.kind not in "iu":
            msg = f"{name} holds {parts[name].dtype} values, not integers"
            raise corrupt(msg)
    _check_values(parts["data"], counts, error)
    major = shape[0] if encoding == "csr_matrix" else shape[1]
    n_entries, indptr = parts["data"].shape[0], parts["indptr"]
    if indptr.shape[0] != major + 1:
        axis = "cells" if encoding == "csr_matrix" else "genes"
        msg = f"indptr has {indptr.shape[0]} values, but {major} {axis} need {major + 1}"
        raise corrupt(msg)
    if parts["indices"].shape[0] != n_entries:
        msg = f"indices has {parts['indices'].shape[0]} values but data {n_entries}"
        raise corrupt(msg)
    first, last = int(indptr[0]), int(indptr[-1])
    if first != 0 or last != n_entries:
        msg = f"indptr runs from {first} to {last}, but data has {n_entries} values (from 0)"
        raise corrupt(msg)
    return shape


def _shape_attribute(node: h5py.Group) -> tuple[int, int] | None:
    """The ``shape`` (or, anndata < 0.7, ``h5sparse_shape``) attribute as two sizes; ``None`` when it is not that."""
    stored = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
    try:
        values = np.asarray(stored).ravel()
        sizes = values.astype(np.int64)
    except (TypeError, ValueError):
        return None
    if values.size != 2 or values.dtype.kind not in "iuf" or (sizes != values).any() or (sizes < 0).any():
        return None
    return int(sizes[0]), int(sizes[1])


def _check_values(dataset: h5py.Dataset, counts: str, error: Callable[[str], InputError]) -> None:
    """The matrix's values must be numbers (their being counts is checked chunk by chunk)."""
    if dataset.dtype.kind not in "biuf":
        msg = (
            f"the {counts} matrix holds {dataset.dtype} values, not numbers; Geneformer tokenization needs raw "
            f"integer counts ({COUNT_SOURCES_HELP})"
        )
        raise error(msg)


def _is_number(value: object) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


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
    """Number of cells of an ``.h5ad`` file, read from the matrix header only (cheap).

    Raises:
        InputError: the file cannot be read, or its count matrix is missing or malformed.
    """
    path = Path(path)

    def error(problem: str) -> InputError:
        return InputError(f"{path}: {problem}")

    with _open_h5ad(path) as f:
        node, _ = _locate(f, counts, error)
        return _matrix_shape(node, counts, error)[0]


def header_cell_count(path: str | Path, counts: str = "X") -> int:
    """Cells of an ``.h5ad`` file from its count matrix's header (about 1 ms; no value is read).

    Anything unexpected (not HDF5, no such matrix, an odd shape) defers to :func:`count_cells`, which checks the
    matrix's layout and raises the :class:`InputError` every ``gfw`` command gives for that file.
    """
    path = Path(path)
    try:
        with _open_h5ad(path) as f:
            node, _ = _locate(f, counts, InputError)
            shape = node.shape if hasattr(node, "ndim") else _shape_attribute(node)
            if shape is not None and len(shape) == 2:
                return int(shape[0])
    except (InputError, OSError, KeyError, TypeError, ValueError):
        pass
    return count_cells(path, counts)
