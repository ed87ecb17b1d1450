"""Property: a CSR count matrix is either well-formed and tokenized like its dense equivalent, or refused cleanly.

Hypothesis draws small count matrices, stores them as CSR the ways real files do (modern or anndata 0.6
attributes, several dtypes, explicit zeros, unsorted and duplicate entries), and then breaks the
structure in one of many ways (indptr values, lengths, missing or 2-D datasets, out-of-range indices,
non-integer dtypes, a wrong shape attribute, values that are not counts). An independent statement of
what a valid structure is decides the expected outcome: an :class:`InputError` naming the file (never
another exception), or tokens and chunks equal to those of the same counts stored dense.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.testing import write_counts_h5ad
from geneformer_workflow.tokenize.h5ad import H5adCounts, InputError
from geneformer_workflow.tokenize.tokenizer import tokenize_h5ad
from geneformer_workflow.tokenize.vocab import build_token_dictionary
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .cases import GENES, MEDIANS

TOKENS = build_token_dictionary(GENES, PRESETS["v1"])
PARTS = ("data", "indices", "indptr")


@st.composite
def stored_csr(draw: st.DrawFn) -> dict:
    """A well-formed CSR matrix as a file may store it: its parts, dtypes, attributes and the counts it encodes."""
    n_obs, n_vars = draw(st.integers(1, 5)), draw(st.integers(1, len(GENES)))
    counts = np.array(draw(st.lists(st.integers(0, 4), min_size=n_obs * n_vars, max_size=n_obs * n_vars)))
    counts = counts.reshape(n_obs, n_vars)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows: list[list[tuple[int, int]]] = []
    for row in counts:
        entries = [(int(c), int(v)) for c, v in enumerate(row) if v]
        if draw(st.booleans()) and entries:  # a count split into two entries of one column (summed)
            c, v = entries.pop(int(rng.integers(len(entries))))
            entries += [(c, v - v // 2), (c, v // 2)]
        if draw(st.booleans()):  # an explicitly stored zero
            entries.append((int(rng.integers(n_vars)), 0))
        if draw(st.booleans()):  # columns not sorted within the row
            rng.shuffle(entries)
        rows.append(entries)
    indptr = np.cumsum([0] + [len(r) for r in rows])
    flat = [e for r in rows for e in r]
    return {
        "parts": {
            "data": np.array(
                [v for _, v in flat], dtype=draw(st.sampled_from(["float32", "float64", "int32", "uint16"]))
            ),
            "indices": np.array([c for c, _ in flat], dtype=draw(st.sampled_from(["int32", "int64", "uint32"]))),
            "indptr": indptr.astype(draw(st.sampled_from(["int32", "int64"]))),
        },
        "shape": (n_obs, n_vars),
        "legacy": draw(st.booleans()),  # anndata 0.6: h5sparse_format / h5sparse_shape
        "counts": counts,
    }


def _set(parts: dict, name: str, values: np.ndarray) -> dict:
    return {**parts, name: values}


DEFECTS = [
    "none",
    "indptr-value",
    "indptr-length",
    "entries-length",
    "index-value",
    "missing-part",
    "two-dimensional",
    "float-indices",
    "text-data",
    "shape-attribute",
    "not-a-count",
]


@st.composite
def defects(draw: st.DrawFn, csr: dict, kind: str) -> tuple[str, dict, tuple]:
    """The structure broken in the way ``kind`` names (drawn details): the way, the parts and the shape attribute.

    The way is "none" where there is nothing to break (e.g. an index in a matrix without entries).
    """
    parts, shape = csr["parts"], csr["shape"]
    nnz = parts["data"].size
    if kind == "indptr-value":
        indptr = parts["indptr"].astype(np.int64)
        indptr[draw(st.integers(0, indptr.size - 1))] = draw(st.integers(-2, nnz + 2))
        return kind, _set(parts, "indptr", indptr), shape
    if kind == "indptr-length":
        extra = draw(st.integers(-parts["indptr"].size, -1) | st.integers(1, 2))
        indptr = parts["indptr"][:extra] if extra < 0 else np.append(parts["indptr"], [nnz] * extra)
        return kind, _set(parts, "indptr", indptr), shape
    if kind == "entries-length":  # data and/or indices shorter or longer than indptr says
        changed = draw(st.sampled_from([("data",), ("indices",), ("data", "indices")]))
        extra = draw(st.integers(-nnz, -1) | st.integers(1, 2)) if nnz else draw(st.integers(1, 2))
        for name in changed:
            values = parts[name]
            parts = _set(
                parts, name, values[:extra] if extra < 0 else np.append(values, [1] * extra).astype(values.dtype)
            )
        return kind, parts, shape
    if kind == "index-value" and nnz:
        indices = parts["indices"].astype(np.int64)
        indices[draw(st.integers(0, nnz - 1))] = draw(st.sampled_from([-1, shape[1], shape[1] + 5, 2**31 - 1]))
        return kind, _set(parts, "indices", indices), shape
    if kind == "missing-part":
        missing = draw(st.sampled_from(PARTS))
        return kind, {k: v for k, v in parts.items() if k != missing}, shape
    if kind == "two-dimensional":
        name = draw(st.sampled_from(PARTS))
        return kind, _set(parts, name, np.stack([parts[name], parts[name]], axis=1)), shape
    if kind == "float-indices":
        name = draw(st.sampled_from(["indices", "indptr"]))
        return kind, _set(parts, name, parts[name].astype(np.float64)), shape
    if kind == "text-data":
        return kind, _set(parts, "data", parts["data"].astype("S8")), shape
    if kind == "shape-attribute":
        wrong = draw(
            st.sampled_from([(shape[0] + 1, shape[1]), (shape[0], shape[1] + 1), (shape[0],), (-1, shape[1])])
        )
        return kind, parts, wrong
    if kind == "not-a-count" and nnz:
        data = parts["data"].astype(np.float64)
        data[draw(st.integers(0, nnz - 1))] = draw(st.sampled_from([np.nan, np.inf, -1.0, 0.5]))
        return kind, _set(parts, "data", data), shape
    return "none", parts, shape


def encoded_counts(parts: dict, shape: tuple, n_obs: int, n_vars: int) -> np.ndarray | None:
    """The dense counts a stored CSR structure encodes, or ``None`` when it is not a valid count matrix.

    The specification, written independently of the reader: the three parts exist and are 1-D, indices and
    indptr are integers and data numbers; indptr has one value per cell plus one, starts at 0, never
    decreases and ends at the number of entries, which data and indices both have; column indices are
    genes; values are finite nonnegative integers. Entries of one column in a row add up.
    """
    if set(parts) != set(PARTS) or any(p.ndim != 1 for p in parts.values()) or tuple(shape) != (n_obs, n_vars):
        return None
    data, indices, indptr = parts["data"], parts["indices"], parts["indptr"]
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu" or data.dtype.kind not in "biuf":
        return None
    if indptr.size != n_obs + 1 or indptr[0] != 0 or indptr[-1] != data.size or indices.size != data.size:
        return None
    if any(indptr[i + 1] < indptr[i] for i in range(n_obs)):
        return None
    if any(not 0 <= int(c) < n_vars for c in indices):
        return None
    if any(not (np.isfinite(v) and v >= 0 and v == int(v)) for v in data.astype(np.float64)):
        return None
    dense = np.zeros((n_obs, n_vars))
    for row in range(n_obs):
        for entry in range(int(indptr[row]), int(indptr[row + 1])):
            dense[row, int(indices[entry])] += float(data[entry])
    return dense


def _write(path: Path, counts: np.ndarray, parts: dict, shape: tuple, *, legacy: bool) -> Path:
    """An anndata file of ``counts``' cells and genes whose X is replaced by the given CSR parts."""
    write_counts_h5ad(path, counts, GENES[: counts.shape[1]])
    with h5py.File(path, "r+") as f:
        del f["X"]
        group = f.create_group("X")
        if legacy:
            group.attrs["h5sparse_format"], group.attrs["h5sparse_shape"] = "csr", shape
        else:
            group.attrs["encoding-type"], group.attrs["encoding-version"] = "csr_matrix", "0.1.0"
            group.attrs["shape"] = shape
        for name, values in parts.items():
            group[name] = values
    return path


def _tokenize(path: Path, chunk_size: int, *, raise_errors: bool = False) -> dict | str:
    """The corpus of ``path`` as a dict, or the InputError's message with the file's path replaced."""
    out = path.with_name(f"{path.stem}.parquet")
    try:
        tokenize_h5ad(
            path,
            out,
            token_dictionary=TOKENS,
            gene_medians=MEDIANS.to_dict(),
            preset=PRESETS["v1"],
            chunk_size=chunk_size,
            validation_fraction=0.3,
        )
    except InputError as err:
        if raise_errors:
            raise
        return str(err).replace(str(path), "<file>")
    return pq.read_table(out).to_pydict()


@pytest.mark.parametrize("defect", DEFECTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), chunk_size=st.integers(1, 4))
def test_a_csr_matrix_is_read_as_it_encodes_or_refused_naming_the_file(tmp_path, defect, data, chunk_size):
    csr = data.draw(stored_csr())
    kind, parts, shape = data.draw(defects(csr, defect))
    n_obs, n_vars = csr["shape"]
    expected = encoded_counts(parts, shape, n_obs, n_vars)
    assert kind != "none" or expected is not None  # the drawn variations of a valid matrix are all valid
    event(f"{kind}: {'valid' if expected is not None else 'refused'}")
    work = tmp_path / uuid.uuid4().hex
    work.mkdir()
    path = _write(work / "in.h5ad", csr["counts"], parts, shape, legacy=csr["legacy"])

    if expected is None:
        with pytest.raises(InputError) as chunks_error:
            with H5adCounts(path) as reader:
                list(reader.iter_chunks(chunk_size))
        assert str(chunks_error.value).startswith(f"{path}: "), kind
        with pytest.raises(InputError) as tokenize_error:
            _tokenize(path, chunk_size, raise_errors=True)
        assert str(tokenize_error.value).startswith(f"{path}: "), kind
        assert [p.name for p in work.iterdir()] == ["in.h5ad"]  # no corpus, not even a part of one
        return

    # QC and medians read float64 CSR chunks: equal to the encoded counts, zeros dropped, columns sorted
    with H5adCounts(path) as reader:
        chunks = list(reader.iter_chunks(chunk_size))
    matrix = sp.vstack([c.matrix for c in chunks], format="csr")
    np.testing.assert_array_equal(matrix.toarray(), expected)
    assert matrix.has_canonical_format and not (matrix.data == 0).any()
    dense = write_counts_h5ad(work / "dense.h5ad", expected, GENES[:n_vars], matrix_format="dense")
    assert _tokenize(path, chunk_size) == _tokenize(dense, chunk_size)
