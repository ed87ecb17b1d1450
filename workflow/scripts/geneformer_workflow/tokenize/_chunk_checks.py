"""Helpers of the chunk reader: reused buffers, read-ahead, and the checks that make a chunk canonical CSR."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_DONE = object()


class MatrixDefect(ValueError):
    """A broken count matrix structure, found while reading; the reader adds the file and matrix names."""


def readable_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a matrix's stored values are read as: native byte order, float16 as float32.

    scipy refuses float16, and every float16 value converts exactly.
    """
    if dtype.kind == "f" and dtype.itemsize < 4:
        return np.dtype(np.float32)
    return dtype.newbyteorder("=")


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """``items``, each produced on a background thread while the caller works on the one before."""
    with ThreadPoolExecutor(1, "read-ahead") as pool:
        pending = pool.submit(next, items, _DONE)
        while (item := pending.result()) is not _DONE:
            pending = pool.submit(next, items, _DONE)
            yield item


class Buffers:
    """Arrays reused from chunk to chunk, grown when a chunk needs more room."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, dtype: np.dtype, size: int) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None or array.dtype != dtype or array.size < size:
            # 25% headroom: chunks differ in size, and every new buffer costs its page faults again
            array = self._arrays[name] = np.empty(max(size + size // 4, 1), dtype=dtype)
        return array[:size]


def counts_low(data: np.ndarray, buffers: Buffers, step: int = 1 << 16) -> tuple[bool, float]:
    """Whether all values are finite nonnegative integers, and the smallest value.

    Blocks of ``step`` values, so that the min, max and floor passes read each block from cache.
    """
    floor = buffers.get("floor", data.dtype, min(step, data.size))
    flags = buffers.get("flags", np.dtype(bool), min(step, data.size))
    low = np.inf
    for start in range(0, data.size, step):
        part = data[start : start + step]
        part_low, part_high = part.min(), part.max()
        # NaN fails `>= 0`; floor(x) == x holds for integers only (checked for float dtypes alone).
        if not (part_low >= 0 and np.isfinite(part_high)):
            return False, float(part_low)
        if (
            data.dtype.kind == "f"
            and not np.equal(np.floor(part, out=floor[: part.size]), part, out=flags[: part.size]).all()
        ):
            return False, float(part_low)
        low = min(low, float(part_low))
    return True, low


def is_canonical(indptr: np.ndarray, indices: np.ndarray, buffers: Buffers) -> bool:
    """Whether column indices strictly increase within every row (sorted, no duplicates)."""
    if indices.size < 2:
        return True
    # step_ok[i]: indices[i] -> indices[i + 1]
    step_ok = np.greater(indices[1:], indices[:-1], out=buffers.get("flags", np.dtype(bool), indices.size - 1))
    starts = np.unique(indptr[1:-1])  # empty rows repeat a start
    starts = starts[(starts > 0) & (starts < indices.size)]
    # Every failing step must be a step from one row into the next.
    return int(np.count_nonzero(step_ok)) + int(np.count_nonzero(~step_ok[starts - 1])) == step_ok.size


def to_canonical(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_vars: int) -> tuple[np.ndarray, ...]:
    """Sort columns within rows and sum duplicate entries (float64), as scipy's ``sum_duplicates``."""
    import scipy.sparse as sp  # imported here: it costs a quarter of a second, and canonical files never need it

    matrix = sp.csr_matrix((data.astype(np.float64), indices.copy(), indptr.copy()), shape=(indptr.size - 1, n_vars))
    matrix.sum_duplicates()
    return matrix.indptr.astype(np.int64), matrix.indices, matrix.data
