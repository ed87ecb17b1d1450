"""obs/var read straight from HDF5 equal what anndata reads, and unknown encodings fall back to anndata."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from anndata import OldFormatWarning
from anndata.io import read_elem
from geneformer_workflow.tokenize._h5frame import column_names, read_column, read_column_parts, read_dataframe


def _frame(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "n_counts": rng.random(n).astype(np.float32),
            "n_genes": rng.integers(0, 100, n),
            "filter_pass": rng.integers(0, 2, n).astype(bool),
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], n)),
            "stage": pd.Categorical(rng.choice(["a", "b"], n), categories=["b", "a"], ordered=True),
            "donor": rng.choice(["d1", "d2"], n).astype(object),
            "batch": pd.array([1, None, 3, 4, None, 6][:n], dtype="Int64"),
            "flag": pd.array([True, None, False, True, False, None][:n], dtype="boolean"),
        },
        index=pd.Index([f"cell{i}" for i in range(n)], name="barcode"),
    )


@pytest.fixture
def h5ad(tmp_path):
    obs = _frame()
    var = pd.DataFrame({"symbol": ["A", "B", "C"]}, index=[f"ENSG{i:011d}" for i in range(3)])
    path = tmp_path / "frames.h5ad"
    ad.AnnData(X=np.ones((len(obs), 3), np.float32), obs=obs, var=var).write_h5ad(path)
    return path


def test_dataframes_equal_anndatas(h5ad):
    with h5py.File(h5ad) as f:
        for name in ("obs", "var"):
            pd.testing.assert_frame_equal(read_dataframe(f[name]), read_elem(f[name]))


def test_one_column_or_the_index_alone(h5ad):
    with h5py.File(h5ad) as f:
        expected = read_elem(f["obs"])
        assert column_names(f["obs"]) == list(expected.columns)
        assert read_column(f["obs"], None).tolist() == expected.index.tolist()
        for key in ("n_counts", "n_genes", "filter_pass", "donor"):
            assert np.array_equal(read_column(f["obs"], key), expected[key].to_numpy())
        assert read_column(f["obs"], "cell_type").tolist() == expected["cell_type"].astype(str).tolist()
        # missing values of nullable columns: None (booleans) and NaN (integers)
        assert read_column(f["obs"], "flag").tolist() == [True, None, False, True, False, None]
        np.testing.assert_array_equal(read_column(f["obs"], "batch"), [1, np.nan, 3, 4, np.nan, 6])


def test_column_parts_keep_codes_masks_and_missing_categories(tmp_path):
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(["T", None, "B"], categories=["B", "T"])}, index=["c0", "c1", "c2"]
    )
    path = tmp_path / "missing.h5ad"
    ad.AnnData(X=np.ones((3, 1), np.float32), obs=obs).write_h5ad(path)
    with h5py.File(path) as f:
        parts = read_column_parts(f["obs"], "cell_type")
        assert (parts.kind, parts.values.tolist()) == ("categorical", [1, -1, 0])
        assert parts.categories.tolist() == ["B", "T"]
        assert parts.to_numpy().tolist() == ["T", None, "B"]
        pd.testing.assert_frame_equal(read_dataframe(f["obs"]), read_elem(f["obs"]))


def test_a_column_in_an_unknown_encoding_comes_through_anndata(h5ad):
    with h5py.File(h5ad, "r+") as f:
        f["obs/donor"].attrs["encoding-version"] = "9.9.9"
        del f["obs"].attrs["encoding-version"]  # a frame we do not read ourselves: anndata reads it all
    with h5py.File(h5ad) as f, pytest.raises(Exception, match="encoding"):
        read_column(f["obs"], "donor")  # anndata's own error, not a silently wrong column


def test_an_unknown_encoding_falls_back_to_anndata(h5ad):
    with h5py.File(h5ad, "r+") as f:
        f["obs/donor"].attrs["encoding-version"] = "9.9.9"  # not one we read ourselves
    with h5py.File(h5ad) as f, pytest.raises(Exception, match=r"9\.9\.9"):
        read_dataframe(f["obs"])  # anndata's own error, not a silently wrong frame


def test_a_legacy_compound_frame_reads_as_anndata_reads_it(tmp_path):
    """anndata < 0.7: one compound dataset; uns categories apply where every code is valid (anndata's rule)."""
    records = np.array(
        [(b"c0", 0, 2, 1.5), (b"c1", 1, 0, 2.5), (b"c2", 1, 1, 0.5)],
        dtype=[("index", "S2"), ("kind", "i1"), ("batch", "i8"), ("score", "f4")],
    )
    path = tmp_path / "legacy.h5ad"
    with h5py.File(path, "w") as f:
        f["X"] = np.ones((3, 2), np.float32)
        f["obs"] = records
        f["var"] = np.array([(b"g0",), (b"g1",)], dtype=[("index", "S2")])
        f.create_dataset("uns/kind_categories", data=np.array(["B", "T"], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("uns/batch_categories", data=np.array(["x", "y"], dtype=object), dtype=h5py.string_dtype())
    with pytest.warns(OldFormatWarning):
        expected = ad.read_h5ad(path).obs
    with h5py.File(path) as f:
        assert column_names(f["obs"]) == ["kind", "batch", "score"]
        assert read_column(f["obs"], None).tolist() == ["c0", "c1", "c2"]
        assert read_column(f["obs"], "kind").tolist() == ["B", "T", "T"]
        assert read_column(f["obs"], "batch").tolist() == [2, 0, 1]  # code 2 has no category: not categorical
        pd.testing.assert_frame_equal(read_dataframe(f["obs"]), expected, check_index_type=False)
        with pytest.raises(KeyError):
            read_column(f["obs"], "absent")
