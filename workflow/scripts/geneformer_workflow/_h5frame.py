"""Read an AnnData ``obs``/``var`` dataframe, or one of its columns, straight from HDF5.

Importing anndata costs about a third of a second and pandas almost half a second, more than a third
of a whole ``gfw tokenize`` run on a 20,000-cell file. The encodings that AnnData writes by default
(numeric and string arrays, categoricals, nullable integers and booleans; ``dataframe`` 0.2.0) are
read here with h5py and numpy alone, column by column; pandas is imported only to build a whole
dataframe (:func:`read_dataframe`, exactly as ``anndata.io.read_elem`` builds it). Any other encoding
(older files, new types) is handed to anndata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ColumnParts:
    """One stored column, as its parts.

    ``kind`` is ``array`` (plain numeric or string values), ``categorical`` (``values`` are the codes,
    -1 for missing; ``categories`` the labels), ``nullable-integer`` or ``nullable-boolean`` (``mask``
    is true where a value is missing).
    """

    values: np.ndarray
    kind: str = "array"
    mask: np.ndarray | None = None
    categories: np.ndarray | None = None
    ordered: bool = False

    def to_numpy(self) -> np.ndarray:
        """One numpy array: categories looked up, missing values as ``None`` (integers: NaN)."""
        if self.kind == "categorical":
            labels = np.asarray(self.categories, dtype=object)
            out = labels.take(self.values, mode="clip")
            out[self.values < 0] = None
            return out
        if self.mask is None or not self.mask.any():
            return self.values
        if self.kind == "nullable-integer":
            out = self.values.astype(np.float64)
            out[self.mask] = np.nan
            return out
        out = self.values.astype(object)
        out[self.mask] = None
        return out

    def to_pandas(self) -> object:
        """The values as ``anndata.io.read_elem`` gives them (a Categorical or masked array where it does)."""
        import pandas as pd

        if self.kind == "categorical":
            return pd.Categorical.from_codes(codes=self.values, categories=self.categories, ordered=self.ordered)
        if self.kind == "nullable-integer":
            return pd.arrays.IntegerArray(self.values, mask=self.mask)
        if self.kind == "nullable-boolean":
            return pd.arrays.BooleanArray(self.values, mask=self.mask)
        return self.values


def _attr(node: h5py.HLObject, name: str) -> str:
    value = node.attrs.get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _spec(node: h5py.HLObject) -> tuple[str, str]:
    return _attr(node, "encoding-type"), _attr(node, "encoding-version")


def _array(node: h5py.HLObject) -> np.ndarray | None:
    """A numeric or string array, or ``None`` when its encoding is not one of the two plain ones."""
    if not isinstance(node, h5py.Dataset):
        return None
    spec = _spec(node)
    if spec == ("array", "0.2.0") and node.dtype.kind in "biuf":
        return node[()]
    if spec == ("string-array", "0.2.0") and h5py.check_string_dtype(node.dtype) is not None:
        return node.asstr()[()]
    return None


def _group_parts(node: h5py.Group) -> ColumnParts | None:
    kind = _spec(node)
    if kind == ("categorical", "0.2.0"):
        codes, categories = _array(node["codes"]), _array(node["categories"])
        if codes is None or categories is None:
            return None
        return ColumnParts(codes, "categorical", categories=categories, ordered=bool(node.attrs.get("ordered")))
    if kind in (("nullable-integer", "0.1.0"), ("nullable-boolean", "0.1.0")):
        values, mask = _array(node["values"]), _array(node["mask"])
        return None if values is None or mask is None else ColumnParts(values, kind[0], mask=mask.astype(bool))
    return None


def _parts(node: h5py.HLObject) -> ColumnParts | None:
    """The parts of a column we read ourselves, or ``None`` (an encoding left to anndata)."""
    if isinstance(node, h5py.Dataset):
        values = _array(node)
        return None if values is None else ColumnParts(values)
    try:
        return _group_parts(node)
    except KeyError:  # a member is missing: let anndata report it
        return None


def _is_ours(group: h5py.Group) -> bool:
    return _spec(group) == ("dataframe", "0.2.0")


def read_dataframe(group: h5py.Group) -> pd.DataFrame:
    """The dataframe stored in ``group``, as ``anndata.io.read_elem(group)`` returns it."""
    import pandas as pd

    if _is_ours(group):
        columns = column_names(group)
        index_key = _attr(group, "_index")
        index = _array(group[index_key])
        parts = {k: _parts(group[k]) for k in columns}
        if index is not None and all(v is not None for v in parts.values()):
            data = {k: v.to_pandas() for k, v in parts.items()}
            frame = pd.DataFrame(data, index=index, columns=columns if columns else None)
            if index_key != "_index":
                frame.index.name = index_key
            return frame
    return _anndata_read_elem(group)


def column_names(group: h5py.Group) -> list[str]:
    """The column names of the dataframe in ``group``, in order (its index excluded)."""
    if _is_ours(group):
        return [str(c) for c in group.attrs["column-order"]]
    return [str(c) for c in _anndata_read_elem(group).columns]


def read_column_parts(group: h5py.Group, key: str | None) -> ColumnParts:
    """One column of the dataframe in ``group`` (``None``: its index), without reading the others.

    An encoding we do not read ourselves comes through anndata, as plain values (``None`` where missing).
    """
    if _is_ours(group):
        parts = _parts(group[_attr(group, "_index") if key is None else key])
        if parts is not None:
            return parts
    frame = _anndata_read_elem(group)
    values = frame.index if key is None else frame[key]
    plain = isinstance(values.dtype, np.dtype) and (values.dtype.kind in "biufSU" or not values.hasnans)
    return ColumnParts(values.to_numpy() if plain else values.to_numpy(dtype=object, na_value=None))


def read_column(group: h5py.Group, key: str | None) -> np.ndarray:
    """One column of the dataframe in ``group`` (``None``: its index) as a numpy array (see :class:`ColumnParts`)."""
    return read_column_parts(group, key).to_numpy()


def _anndata_read_elem(group: h5py.Group) -> pd.DataFrame:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(group)
