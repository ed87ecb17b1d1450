"""Rank every cell's genes by normalised value (descending; exact ties by ascending token id) — fast and exact.

A per-cell ``argsort`` costs ~80 µs for 2,000 genes on a small CPU. Instead every entry gets one
64-bit key: the bitwise NOT of its float64 value (for positive floats the bit pattern is monotone, so
NOT orders descending) with the low ``column_bits`` bits replaced by its column. Sorting a cell's keys
with numpy's SIMD sort (a few ns per key) orders its genes, and the column comes back from the key.
Rows are processed in blocks of about ``BLOCK_ENTRIES`` entries in preallocated buffers, so every
pass stays in cache.

The key drops the value's lowest ``column_bits`` mantissa bits, which merges exactly equal values and
values closer than 2^-(52 - column_bits) relative (~1e-11 for 60,000 columns). Runs of neighbours with
equal truncated keys are therefore re-sorted exactly — by the full float64 value, then by token id — so
the result always equals a stable per-cell sort by (value descending, token id ascending).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

TARGET_SUM = 10_000.0
BLOCK_ENTRIES = 32_768  # entries ranked at once: their keys and columns fit in L2 cache
_U64 = np.uint64


def rank_rows(
    indptr: np.ndarray,
    columns: np.ndarray,
    counts: np.ndarray,
    inv_n_counts: np.ndarray,
    column_inv_median: np.ndarray,
    column_token: np.ndarray,
    max_genes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every row, highest value first, at most ``max_genes`` per row.

    The value of an entry is ``((count * inv_n_counts[row]) * 10000) * column_inv_median[column]``
    in float64, upstream Geneformer's order of operations.

    Args:
        indptr: CSR row pointer starting at 0 (int64).
        columns: column of each entry; strictly increasing within a row.
        counts: positive count of each entry (any numeric dtype).
        inv_n_counts: ``1 / n_counts`` of each row (float64).
        column_inv_median: ``1 / median`` of each column (float64, positive).
        column_token: token id of each column (int32).
        max_genes: tokens kept per row.

    Returns:
        ``(tokens, lengths)``: the concatenated token ids (int32) and the number of tokens of each row.
    """
    per_row = np.diff(indptr)
    lengths = np.minimum(per_row, max_genes).astype(np.int32)
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    bounds = _blocks(indptr)
    ranker = _BlockRanker(columns, counts, inv_n_counts, column_inv_median, column_token)
    out = 0
    for r0, r1 in pairwise(bounds.tolist()):
        kept = int(lengths[r0:r1].sum())
        ranker.rank(r0, indptr[r0 : r1 + 1], max_genes, tokens[out : out + kept])
        out += kept
    return tokens, lengths


def _blocks(indptr: np.ndarray) -> np.ndarray:
    """Row boundaries of blocks of about ``BLOCK_ENTRIES`` entries (a longer row is a block of its own)."""
    targets = np.arange(BLOCK_ENTRIES, int(indptr[-1]), BLOCK_ENTRIES)
    inner = np.searchsorted(indptr, targets, side="right") - 1
    bounds = np.unique(np.concatenate(([0], inner, [indptr.size - 1])))
    return bounds if bounds.size > 1 else np.array([0, 0])


class _BlockRanker:
    """Ranks blocks of consecutive rows in buffers reused from block to block."""

    def __init__(
        self,
        columns: np.ndarray,
        counts: np.ndarray,
        inv_n: np.ndarray,
        column_inv_median: np.ndarray,
        column_token: np.ndarray,
    ) -> None:
        self.columns, self.counts, self.inv_n = columns, counts, inv_n
        self.column_inv_median, self.column_token = column_inv_median, column_token
        self.column_bits = max(1, int(column_token.size - 1).bit_length())
        size = BLOCK_ENTRIES + 1
        self.keys = np.empty(size, dtype=_U64)
        self.column = np.empty(size, dtype=np.int64)  # int64: numpy's take() converts other index types
        self.factor = np.empty(size, dtype=np.float64)
        self.equal = np.empty(size, dtype=bool)

    def _buffers(self, n: int) -> tuple[np.ndarray, ...]:
        if n > self.keys.size:  # a row longer than a block
            for name in ("keys", "column", "factor", "equal"):
                setattr(self, name, np.empty(n, dtype=getattr(self, name).dtype))
        return self.keys[:n], self.column[:n], self.factor[:n], self.equal[: max(n - 1, 0)]

    def rank(self, r0: int, indptr: np.ndarray, max_genes: int, out: np.ndarray) -> None:
        """Write the tokens of rows ``r0:r0 + len(indptr) - 1`` to ``out``: each row sorted, at most ``max_genes``."""
        lo, hi = int(indptr[0]), int(indptr[-1])
        starts = indptr - lo
        keys, column, factor, equal = self._buffers(hi - lo)
        np.copyto(column, self.columns[lo:hi], casting="unsafe")
        # Upstream Geneformer's float64 arithmetic and order: ((count * (1/n)) * 10000) * (1/median).
        values = keys.view(np.float64)
        np.copyto(values, self.counts[lo:hi], casting="unsafe")  # exact: integer counts
        values *= np.repeat(self.inv_n[r0 : r0 + starts.size - 1], np.diff(starts))
        values *= TARGET_SUM
        values *= self.column_inv_median.take(column, mode="clip", out=factor)
        low = _U64((1 << self.column_bits) - 1)
        np.invert(keys, out=keys)  # descending value; the sign bit (0) becomes 1 everywhere
        keys &= ~low
        keys |= column.view(_U64)
        for a, b in pairwise(starts.tolist()):
            if b - a > 1:
                keys[a:b].sort()
        np.bitwise_and(keys, low, out=column.view(_U64))  # the columns in ranked order
        keys >>= _U64(self.column_bits)  # the truncated values
        np.equal(keys[1:], keys[:-1], out=equal)
        if equal.any():
            self._resolve_runs(np.flatnonzero(equal), starts, lo, column, r0)
        if out.size == column.size:
            self.column_token.take(column, mode="clip", out=out)
            return
        done = 0
        for a, b in _heads(starts, max_genes):
            self.column_token.take(column[a:b], mode="clip", out=out[done : done + b - a])
            done += b - a

    def _resolve_runs(self, equal: np.ndarray, starts: np.ndarray, lo: int, column: np.ndarray, r0: int) -> None:
        """Re-sort exactly each run of neighbours whose truncated values are equal (``column`` in place).

        ``equal[i]``: ranked entries ``i`` and ``i + 1`` share a truncated value; a pair straddling two
        rows is no run. ``column``: the columns in ranked order.
        """
        row = np.searchsorted(starts, equal, side="right") - 1
        equal = equal[equal + 1 < starts[row + 1]]
        if not equal.size:
            return
        # Entries in runs, and whether each continues the run of its left neighbour (small arrays: no sorting).
        first = int(equal[0])
        continues = np.zeros(int(equal[-1]) + 2 - first, dtype=bool)
        continues[equal + 1 - first] = True
        in_run = continues.copy()
        in_run[equal - first] = True
        position = np.flatnonzero(in_run) + first
        run = np.cumsum(~continues[position - first])
        row = np.searchsorted(starts, position, side="right") - 1
        ranked = column[position]
        entry = np.empty(position.size, dtype=np.int64)
        for r in dict.fromkeys(row.tolist()):  # the entry holding each column (columns are sorted in a row)
            at = row == r
            a, b = lo + starts[r], lo + starts[r + 1]
            entry[at] = a + np.searchsorted(self.columns[a:b], ranked[at])
        inv_n = self.inv_n[r0 + row]
        values = ((self.counts[entry].astype(np.float64) * inv_n) * TARGET_SUM) * self.column_inv_median[ranked]
        column[position] = ranked[np.lexsort((self.column_token[ranked], -values, run))]


def _heads(starts: np.ndarray, max_genes: int) -> list[tuple[int, int]]:
    """Slices that keep the first ``max_genes`` entries of every row (consecutive whole rows merged)."""
    slices, source = [], 0
    for r in np.flatnonzero(np.diff(starts) > max_genes).tolist():  # rows before r are whole; r loses its tail
        slices.append((source, int(starts[r]) + max_genes))
        source = int(starts[r + 1])
    slices.append((source, int(starts[-1])))
    return slices
