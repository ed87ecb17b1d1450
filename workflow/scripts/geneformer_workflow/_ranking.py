"""Order a block of sparse entries by (cell, value descending, gene ascending) — fast and exact.

A per-cell ``argsort`` costs ~80 µs for 2,000 genes on a small CPU. Instead every entry gets one
64-bit key ``(row | inverted top bits of its float64 value | gene)`` and a block of cells is ordered
by one vectorised ``np.sort`` of the keys (SIMD, a few ns per entry while the block fits in cache).

The key keeps only the top bits of the value (sign 0, the 11 exponent bits and as many mantissa bits
as fit), which is monotone but may merge values closer than ~2^-26 relative. Cells where two
neighbours share (row, truncated value) are re-sorted exactly — by the full float64 value, then by
gene — so the result always equals a stable per-cell argsort by descending value.
"""

from __future__ import annotations

import numpy as np

VALUE_BITS = 38  # sign + exponent + 26 mantissa bits


def key_layout(n_genes: int) -> tuple[int, int]:
    """``(gene_bits, max_rows_per_block)`` for a vocabulary of ``n_genes`` genes."""
    gene_bits = max(1, int(n_genes - 1).bit_length())
    row_bits = 64 - VALUE_BITS - gene_bits
    if row_bits < 1:
        msg = f"a vocabulary of {n_genes} genes is too large for 64-bit ranking keys"
        raise ValueError(msg)
    return gene_bits, 1 << row_bits


def rank_block(row: np.ndarray, gene: np.ndarray, value: np.ndarray, gene_bits: int) -> np.ndarray:
    """Genes of all entries, grouped by row and ordered by value desc, then gene asc.

    Args:
        row: block-local row of each entry, ascending, ``< max_rows_per_block`` of :func:`key_layout`.
        gene: gene index of each entry, unique within a row, ``< 2**gene_bits``.
        value: positive finite float64 value of each entry.
        gene_bits: from :func:`key_layout`.

    Returns:
        The gene indices in ranked order; row ``r`` occupies the same slice as in the input.
    """
    u64 = np.uint64
    truncated = value.view(u64) >> u64(63 - VALUE_BITS)
    keys = row.astype(u64) << u64(VALUE_BITS)
    keys |= u64((1 << VALUE_BITS) - 1) - truncated  # descending value
    keys <<= u64(gene_bits)
    keys |= gene.astype(u64)
    keys.sort()
    ranked = (keys & u64((1 << gene_bits) - 1)).astype(np.int64)
    keys >>= u64(gene_bits)  # (row, truncated value)
    clash = np.flatnonzero(keys[1:] == keys[:-1])
    if clash.size:
        rows = np.unique((keys[clash] >> u64(VALUE_BITS)).astype(np.int64))
        for lo, hi in np.searchsorted(row, np.stack([rows, rows + 1])).T:
            ranked[lo:hi] = gene[lo:hi][np.lexsort((gene[lo:hi], -value[lo:hi]))]
    return ranked
