"""Read an AnnData ``obs``/``var`` dataframe, or one of its columns, straight from HDF5.

Importing anndata costs about a third of a second and pandas almost half a second, more than a third
of a whole ``gfw tokenize`` run on a 20,000-cell file. The encodings that AnnData writes by default
(numeric and string arrays, categoricals, nullable integers and booleans; ``dataframe`` 0.2.0) are
read here with h5py and numpy alone, column by column; pandas is imported only to build a whole
dataframe (:func:`read_dataframe`, exactly as ``anndata.io.read_elem`` builds it). So are the dataframes of
anndata 0.6 and older: one compound-dtype dataset (the index first), categories in ``uns``, exactly as
``anndata.read_h5ad`` reads them. Any other encoding (anndata 0.7's ``dataframe`` 0.1.0, new types) is
handed to anndata.
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


def _is_ours(group: h5py.Group | h5py.Dataset) -> bool:
    return isinstance(group, h5py.Group) and _spec(group) == ("dataframe", "0.2.0")


# -- anndata < 0.7: a dataframe is one compound-dtype dataset ----------------------------------------
# Written by anndata 0.6's `_write_h5ad` (anndata/readwrite/write.py) from `df_to_records_fixed_width`
# (anndata/core/anndata.py): the index is the first field, then one field per column; string columns
# are variable-length (or fixed-width) strings, and categorical columns are stored as their codes with
# the categories in `uns/<column>_categories`. anndata >= 0.7 reads them back with
# `anndata._io.h5ad.read_dataframe_legacy` and `anndata.compat._clean_uns`, as done here.


def _is_legacy(node: h5py.HLObject) -> bool:
    return isinstance(node, h5py.Dataset) and node.dtype.names is not None


def _legacy_parts(node: h5py.Dataset, field: str) -> ColumnParts:
    """One field of a legacy dataframe: decoded strings, codes with their ``uns`` categories, or numbers."""
    values = node[field]  # h5py reads this field of every row alone
    if h5py.check_string_dtype(node.dtype.fields[field][0]) is not None or values.dtype.kind in "SO":
        return ColumnParts(_decoded(values))
    categories = _legacy_categories(node, field)
    # anndata applies the categories only where every code is a valid one (its guess of the axis they belong to)
    if categories is not None and values.dtype.kind in "iu" and (values.size == 0 or values.max() < categories.size):
        return ColumnParts(values.astype(np.int64), "categorical", categories=categories)
    return ColumnParts(values)


def _legacy_categories(node: h5py.Dataset, field: str) -> np.ndarray | None:
    """``uns/<field>_categories`` of an obs or var dataframe, as anndata < 0.7 wrote them (``None``: none)."""
    if node.name not in ("/obs", "/var"):
        return None  # anndata restores the categories of obs and var alone (not raw.var)
    stored = node.file.get(f"uns/{field}_categories")
    if not isinstance(stored, h5py.Dataset):
        return None
    categories = np.atleast_1d(stored[()])
    return _decoded(categories) if categories.dtype.kind in "SO" else categories


def _decoded(values: np.ndarray) -> np.ndarray:
    """An object array of ``str`` from stored bytes (fixed-width or variable-length strings)."""
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.tolist()], dtype=object)


def _legacy_dataframe(node: h5py.Dataset) -> pd.DataFrame:
    import pandas as pd

    index_name, *columns = node.dtype.names
    data = {c: _legacy_parts(node, c).to_pandas() for c in columns}
    return pd.DataFrame(data, index=pd.Index(_legacy_parts(node, index_name).to_numpy(), name=index_name))


def _not_a_dataframe(node: h5py.HLObject) -> ValueError:
    """The error for an ``obs``/``var`` that is neither a dataframe group nor a compound (anndata < 0.7) dataset."""
    kind = f"a dataset of {node.dtype} values" if isinstance(node, h5py.Dataset) else "not a dataset or group"
    msg = f"{node.name} is not a dataframe ({kind}); it must be written by anndata"
    return ValueError(msg)


def read_dataframe(group: h5py.Group | h5py.Dataset) -> pd.DataFrame:
    """The dataframe stored in ``group``, as ``anndata.read_h5ad`` reads it (anndata < 0.7's compound datasets too)."""
    import pandas as pd

    if _is_legacy(group):
        return _legacy_dataframe(group)
    if not isinstance(group, h5py.Group):
        raise _not_a_dataframe(group)
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


def column_names(group: h5py.Group | h5py.Dataset) -> list[str]:
    """The column names of the dataframe in ``group``, in order (its index excluded)."""
    if _is_ours(group):
        return [str(c) for c in group.attrs["column-order"]]
    if _is_legacy(group):
        return list(group.dtype.names[1:])
    if not isinstance(group, h5py.Group):
        raise _not_a_dataframe(group)
    return [str(c) for c in _anndata_read_elem(group).columns]


def read_column_parts(group: h5py.Group | h5py.Dataset, key: str | None) -> ColumnParts:
    """One column of the dataframe in ``group`` (``None``: its index), without reading the others.

    An encoding we do not read ourselves comes through anndata, as plain values (``None`` where missing).

    Raises:
        KeyError: there is no column ``key``.
    """
    if _is_legacy(group):
        names = group.dtype.names
        if key is not None and key not in names[1:]:
            raise KeyError(key)
        return _legacy_parts(group, names[0] if key is None else key)
    if not isinstance(group, h5py.Group):
        raise _not_a_dataframe(group)
    if _is_ours(group):
        parts = _parts(group[_attr(group, "_index") if key is None else key])
        if parts is not None:
            return parts
    frame = _anndata_read_elem(group)
    values = frame.index if key is None else frame[key]
    plain = isinstance(values.dtype, np.dtype) and (values.dtype.kind in "biufSU" or not values.hasnans)
    return ColumnParts(values.to_numpy() if plain else values.to_numpy(dtype=object, na_value=None))


def read_column(group: h5py.Group | h5py.Dataset, key: str | None) -> np.ndarray:
    """One column of the dataframe in ``group`` (``None``: its index) as a numpy array (see :class:`ColumnParts`)."""
    return read_column_parts(group, key).to_numpy()


def _anndata_read_elem(group: h5py.Group) -> pd.DataFrame:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(group)
