"""Arrow arrays from numpy arrays and strings, zero-copy where possible, without ``pyarrow.array``.

``pyarrow.array`` imports pandas on its first call (to test whether its argument is a pandas object),
which costs the tokenizer almost half a second; building the arrays from their buffers does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def _bitmap(flags: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(flags, bitorder="little"))


def numeric(values: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """A numeric or boolean arrow array of ``values`` (shared memory for numbers); ``mask``: true = null."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1:
        msg = f"expected a 1-D array, got shape {values.shape}"
        raise ValueError(msg)
    validity = None if mask is None or not mask.any() else _bitmap(~np.asarray(mask, dtype=bool))
    if values.dtype == bool:
        return pa.Array.from_buffers(pa.bool_(), values.size, [validity, _bitmap(values)])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [validity, pa.py_buffer(values)])


def strings(values: Sequence[str]) -> pa.Array:
    """A string arrow array of ``values`` (``large_string`` past 2 GiB of text)."""
    encoded = [str(v).encode() for v in values]
    sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    kind = pa.large_string()
    if offsets[-1] < 2**31:
        offsets, kind = offsets.astype(np.int32), pa.string()
    return pa.Array.from_buffers(kind, len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])
