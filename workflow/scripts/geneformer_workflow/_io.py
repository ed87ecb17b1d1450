"""Stream raw counts out of an ``.h5ad`` file in row chunks, validating them on the way.

Only ``obs`` and ``var`` are loaded whole; the count matrix is read ``chunk_size`` rows at a time
straight from HDF5, so peak memory is bounded by the chunk, not the file (CSR and dense matrices;
a CSC matrix has no row access and is loaded once, with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

COUNT_SOURCES_HELP = "'X', 'raw' (raw.X) or 'layers/<name>'"


class InputError(ValueError):
    """A problem with a user's input file; the message names the file and the fix."""


def _read_elem(group: h5py.Group) -> pd.DataFrame:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(group)


@dataclass(frozen=True)
class CountChunk:
    """Rows ``start:stop`` of the count matrix as float64 CSR with sorted indices."""

    start: int
    stop: int
    matrix: sp.csr_matrix


class H5adCounts:
    """Row-chunked reader of the raw counts, obs and gene ids of one ``.h5ad`` file.

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
            self._matrix, var_group = self._locate(counts)
            self.obs = _read_elem(self._file["obs"])
            self.var = _read_elem(var_group)
        except KeyError as err:
            self.close()
            msg = f"not a valid AnnData file (missing {err})"
            raise self._error(msg) from err
        self.n_obs, self.n_vars = self._shape()
        self.gene_ids = self._gene_ids(gene_id_key)
        self._check_shape()

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
        if gene_id_key is None:
            ids = self.var.index
        elif gene_id_key in self.var.columns:
            ids = self.var[gene_id_key]
        else:
            msg = (
                f"var has no column {gene_id_key!r} with gene ids "
                f"(columns: {list(self.var.columns)}); set the gene id column or use the var index"
            )
            raise self._error(msg)
        return np.asarray(ids.astype(str), dtype=object)

    def _check_shape(self) -> None:
        if self.n_obs == 0 or self.n_vars == 0:
            msg = f"the count matrix is empty ({self.n_obs} cells x {self.n_vars} genes)"
            raise self._error(msg)
        if len(self.obs) != self.n_obs or len(self.var) != self.n_vars:
            msg = f"matrix is {self.n_obs} x {self.n_vars} but obs has {len(self.obs)} rows and var {len(self.var)}"
            raise self._error(msg)
        obs_look_like_genes = pd.Index(self.obs.index[:100]).str.match(r"^ENS[A-Z]*G\d{6,}").mean() > 0.5
        var_look_like_genes = pd.Index(self.gene_ids[:100]).str.match(r"^ENS[A-Z]*G\d{6,}").mean() > 0.5
        if obs_look_like_genes and not var_look_like_genes:
            msg = (
                "obs names look like Ensembl gene ids — the matrix seems transposed (genes as rows); "
                "write it as cells x genes (adata.T)"
            )
            raise self._error(msg)
        duplicated = self.obs.index.duplicated()
        if duplicated.any():
            msg = (
                f"{int(duplicated.sum())} duplicate cell ids (e.g. {self.obs.index[duplicated][0]!r}); cell ids name "
                "the corpus rows, so make them unique (adata.obs_names_make_unique())"
            )
            raise self._error(msg)

    # -- reading ------------------------------------------------------------------------------
    def iter_chunks(self, chunk_size: int = 2048, *, start: int = 0, stop: int | None = None) -> Iterator[CountChunk]:
        """Yield validated float64 CSR row chunks of rows ``start:stop`` of the count matrix, in order."""
        if chunk_size < 1:
            msg = f"chunk_size must be >= 1, got {chunk_size}"
            raise ValueError(msg)
        whole = None
        if self.encoding == "csc_matrix":
            log.warning("%s: counts are stored as CSC; loading the whole matrix (store CSR to stream)", self.path)
            whole = self._read_csc().tocsr()
        end = self.n_obs if stop is None else stop
        for lo in range(start, end, chunk_size):
            hi = min(lo + chunk_size, end)
            matrix = whole[lo:hi] if whole is not None else self._read_rows(lo, hi)
            matrix = sp.csr_matrix(matrix, dtype=np.float64)
            matrix.sum_duplicates()
            self._validate_counts(matrix, lo)
            matrix.eliminate_zeros()
            yield CountChunk(lo, hi, matrix)

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        node = self._matrix
        if isinstance(node, h5py.Dataset):
            return sp.csr_matrix(node[start:stop])
        if self.encoding != "csr_matrix":
            msg = f"unsupported matrix encoding {self.encoding!r} for {self.counts}"
            raise self._error(msg)
        indptr = node["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = node["data"][lo:hi]
        indices = node["indices"][lo:hi]
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_vars))

    def _read_csc(self) -> sp.csc_matrix:
        node = self._matrix
        return sp.csc_matrix((node["data"][:], node["indices"][:], node["indptr"][:]), shape=(self.n_obs, self.n_vars))

    def _validate_counts(self, matrix: sp.csr_matrix, start: int) -> None:
        data = matrix.data
        if not data.size or (data.min() >= 0 and np.isfinite(data.max()) and np.array_equal(np.floor(data), data)):
            return
        bad = ~np.isfinite(data)
        problem = "NaN or infinite counts"
        if not bad.any():
            bad = data < 0
            problem = "negative counts"
        if not bad.any():
            bad = data != np.floor(data)
            problem = "non-integer counts"
        first = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(matrix.indptr, first, side="right") - 1)
        cell = self.obs.index[start + row]
        msg = (
            f"{self.counts} holds {problem} (e.g. {data[first]:g} in cell {cell!r}); Geneformer tokenization "
            "needs raw integer counts — this looks like normalised, log-transformed or scaled data. "
            f"Point the count source at the raw counts ({COUNT_SOURCES_HELP})"
        )
        raise self._error(msg)

    def n_counts(self, chunk: CountChunk) -> np.ndarray:
        """Total counts per cell over ALL genes: ``obs["n_counts"]`` when present, else the row sums.

        A given ``n_counts`` must be finite and at least the cell's counts in the file (it also counts
        genes the file may lack), else the values would be wrong: that is an error naming the cell.
        """
        row_sums = np.asarray(chunk.matrix.sum(axis=1), dtype=np.float64).ravel()
        if "n_counts" not in self.obs.columns:
            return row_sums
        n_counts = self.obs["n_counts"].to_numpy(dtype=np.float64)[chunk.start : chunk.stop]
        bad = ~np.isfinite(n_counts) | (n_counts < row_sums * (1 - 1e-6))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            msg = (
                f"obs['n_counts'] is inconsistent with the counts: cell {self.obs.index[chunk.start + i]!r} has "
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


def count_cells(path: str | Path, counts: str = "X") -> int:
    """Number of cells of an ``.h5ad`` file, read from the matrix header only (cheap)."""
    with h5py.File(path, "r") as f:
        node = f["raw/X" if counts == "raw" else counts]
        shape = node.shape if isinstance(node, h5py.Dataset) else node.attrs["shape"]
        return int(shape[0])
