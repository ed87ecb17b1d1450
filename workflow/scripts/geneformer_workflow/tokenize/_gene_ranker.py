"""Per-file gene state for tokenizing: file columns → vocabulary genes and ``1 / median``, and a chunk's ranking.

Local gene indices follow ascending token id. The per-column tables (token id, ``1 / median``) let the
ranking kernel (:mod:`geneformer_workflow.tokenize._ranking`) work on the file's own column indices; only a file
with duplicate gene ids first sums its columns (a sparse product).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from geneformer_workflow.tokenize._ranking import rank_rows
from geneformer_workflow.tokenize.genes import collapse_matrix, positions
from geneformer_workflow.tokenize.h5ad import RawChunk


class GeneRanker:
    """Precomputed per-file state: file columns → vocabulary genes, and ``1 / median`` per gene.

    Local gene indices follow ascending token id, so ties in value are broken by token id.
    """

    def __init__(
        self, file_gene_ids: np.ndarray, token_dictionary: Mapping[str, int], medians: Mapping[str, float]
    ) -> None:
        ids = file_gene_ids.tolist()
        usable = sorted((token_dictionary[g], g) for g in set(ids) if g in token_dictionary and g in medians)
        self.token_ids = np.array([t for t, _ in usable], dtype=np.int32)
        genes = [g for _, g in usable]
        self.inv_median = 1.0 / np.array([medians[g] for g in genes], dtype=np.float64)
        self.column_gene = positions(ids, genes)  # file column -> local gene (-1: none)
        mapped = self.column_gene >= 0
        self.all_mapped = bool(mapped.all())
        # Several columns with one id must be summed first (a sparse product); otherwise a lookup suffices.
        n_mapped = int(mapped.sum())
        self.collapse = collapse_matrix(self.column_gene, self.n_genes) if self.n_genes < n_mapped else None
        # Per file column, for the ranking kernel (unmapped columns never reach it).
        self.column_mapped = mapped
        self.column_token = np.zeros(len(ids), dtype=np.int32)
        self.column_token[mapped] = self.token_ids[self.column_gene[mapped]]
        self.column_inv_median = np.zeros(len(ids), dtype=np.float64)
        self.column_inv_median[mapped] = self.inv_median[self.column_gene[mapped]]

    @property
    def n_genes(self) -> int:
        """Number of the file's genes that can become tokens."""
        return len(self.token_ids)

    def rank(
        self, chunk: RawChunk, rows: np.ndarray, n_counts: np.ndarray, max_genes: int, out: np.ndarray | None = None
    ) -> Ranked:
        """Tokens of the cells ``rows`` (a mask over ``chunk``), highest value first, at most ``max_genes`` each.

        ``out``: an int32 array that receives the tokens when it is large enough (see :func:`rank_rows`).
        """
        indptr, columns, counts = chunk.indptr, chunk.indices, chunk.data
        column_token, column_inv_median = self.column_token, self.column_inv_median
        column_mapped = None if self.all_mapped else self.column_mapped
        if self.collapse is not None:
            import scipy.sparse as sp  # only files with duplicate gene ids get here

            shape = (rows.size, len(self.column_gene))
            matrix = sp.csr_matrix((counts.astype(np.float64), columns, indptr), shape=shape)
            matrix = sp.csr_matrix(matrix @ self.collapse)
            matrix.sum_duplicates()  # sorts the columns of every row
            indptr, columns, counts = matrix.indptr.astype(np.int64), matrix.indices, matrix.data
            column_token, column_inv_median, column_mapped = self.token_ids, self.inv_median, None
        entries = _entry_mask(indptr, columns, counts, rows, zeros=chunk.has_zeros, column_mapped=column_mapped)
        if entries is not None:
            indptr = np.concatenate(([0], np.cumsum(_row_counts(entries, indptr))))
            columns, counts = columns[entries], counts[entries]
        inv_n = np.zeros(rows.size, dtype=np.float64)
        np.divide(1.0, n_counts, out=inv_n, where=rows)
        tokens, lengths = rank_rows(indptr, columns, counts, inv_n, column_inv_median, column_token, max_genes, out)
        return Ranked(tokens, lengths, None if self.all_mapped else float(counts.sum(dtype=np.float64)))


@dataclass(frozen=True)
class Ranked:
    """Tokens of a chunk: concatenated token ids, the count per row (0 when not kept), and counts ranked."""

    tokens: np.ndarray
    lengths: np.ndarray
    counts_in_vocabulary: float | None  # None: all of the kept rows' counts


def _entry_mask(
    indptr: np.ndarray,
    columns: np.ndarray,
    counts: np.ndarray,
    rows: np.ndarray,
    *,
    zeros: bool,
    column_mapped: np.ndarray | None,
) -> np.ndarray | None:
    """Entries that can become tokens (in ``rows``, nonzero, mapped column); ``None`` when all can."""
    mask = None
    if not rows.all():
        mask = np.repeat(rows, np.diff(indptr))
    if zeros:
        mask = counts != 0 if mask is None else mask & (counts != 0)
    if column_mapped is not None:
        mapped = column_mapped.take(columns, mode="clip")
        mask = mapped if mask is None else mask & mapped
    return mask


def _row_counts(mask: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Number of true entries of ``mask`` in every row."""
    counts = np.zeros(indptr.size - 1, dtype=np.int64)
    nonempty = indptr[1:] > indptr[:-1]
    if nonempty.any():
        counts[nonempty] = np.add.reduceat(mask.view(np.int8), indptr[:-1][nonempty], dtype=np.int64)
    return counts
