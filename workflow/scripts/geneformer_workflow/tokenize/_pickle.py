"""Read Geneformer's pickled dictionaries without letting a pickle run code.

Only plain containers, ``str``/``int``/``float`` and the two numpy globals that numpy scalars need
(``numpy.core.multiarray.scalar`` and ``numpy.dtype``) may be reconstructed; any other global (e.g.
``os.system``) is refused before it is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np


def _numpy_scalar() -> Any:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals needed for numpy scalars."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if name == "scalar" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_scalar()
        msg = f"refused to load global {module}.{name}: only plain dictionaries of genes are accepted"
        raise pickle.UnpicklingError(msg)


def load_plain_pickle(path: str | Path) -> dict[str, Any]:
    """Load a pickled ``dict`` of plain values through :class:`RestrictedUnpickler`.

    Raises:
        ValueError: the file is not a pickle of a plain dictionary, or it asks for a forbidden global.
    """
    data = Path(path).read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        msg = f"{path}: not a safe Geneformer dictionary pickle ({err})"
        raise ValueError(msg) from err
    if not isinstance(obj, dict):
        msg = f"{path}: expected a pickled dict, found {type(obj).__name__}"
        raise ValueError(msg)
    return {str(key): (value.item() if isinstance(value, np.generic) else value) for key, value in obj.items()}
