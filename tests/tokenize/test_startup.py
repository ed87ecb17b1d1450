"""``gfw tokenize`` starts light: pandas, scipy and anndata (~0.7 s of imports) stay out of it.

The common path (a CSR file with unique gene ids, a QC table, obs columns to keep) must not import
them, and the arrow arrays it builds by hand equal what ``pyarrow.array`` builds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.testing import write_counts_h5ad
from geneformer_workflow.tokenize._arrow import numeric, strings
from geneformer_workflow.tokenize.vocab import build_token_dictionary, write_vocab_dir

from .cases import COUNTS, GENES

HEAVY = ("pandas", "scipy", "anndata", "sklearn", "torch")

RUN_AND_REPORT = f"""
import json, sys
from geneformer_workflow.cli import main
status = main(sys.argv[1:])
print(json.dumps({{"status": status, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_tokenize_imports_no_pandas_scipy_or_anndata(tmp_path, medians_tsv):
    obs = pd.DataFrame({"cell_type": pd.Categorical(["T", None, "B"]), "batch": [1, 2, 3]})
    h5ad = write_counts_h5ad(tmp_path / "in.h5ad", COUNTS, GENES, obs=obs)
    qc = tmp_path / "qc.tsv"
    qc.write_text("cell_id\ttotal_counts\tfilter_pass\ncell0\t9\t1\ncell1\t3\t0\ncell2\t6\t1\n")
    vocab = write_vocab_dir(build_token_dictionary(GENES, PRESETS["v1"]), tmp_path / "vocab", max_length=2048)
    out = tmp_path / "corpus.parquet"
    args = ["tokenize", h5ad, out, "--token-dictionary", vocab, "--gene-medians", medians_tsv, "--preset", "v1"]
    args += ["--cell-filter", qc, "--obs-columns", "cell_type,batch"]
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"status": 0, "heavy": []}
    table = pq.read_table(out)
    assert table.column("cell_id").to_pylist() == ["cell0", "cell2"]
    assert table.column("cell_type").to_pylist() == ["T", "B"]
    assert table.column("batch").to_pylist() == [1, 3]


@pytest.mark.parametrize(
    "values",
    [
        np.array([3, -1, 7], dtype=np.int64),
        np.array([0.5, np.nan, 2.0], dtype=np.float32),
        np.array([True, False, True, True, False, False, True, False, True]),
        np.arange(10, dtype=np.uint16)[::3],  # not contiguous
        np.array([], dtype=np.int32),
    ],
)
def test_numeric_arrays_equal_pyarrows(values):
    mask = np.arange(values.size) % 2 == 1
    for ours, theirs in ((numeric(values), pa.array(values)), (numeric(values, mask), pa.array(values, mask=mask))):
        assert (ours.type, ours.null_count, ours.is_null().to_pylist()) == (
            theirs.type,
            theirs.null_count,
            theirs.is_null().to_pylist(),
        )
        np.testing.assert_array_equal(ours.to_numpy(zero_copy_only=False), theirs.to_numpy(zero_copy_only=False))


def test_string_arrays_equal_pyarrows():
    values = ["cell-1", "", "Zelle_ä", "细胞"]
    assert strings(values).equals(pa.array(values, type=pa.string()))
    assert strings([]).equals(pa.array([], type=pa.string()))
    taken = strings(values).take(numeric(np.array([3, 0], dtype=np.int64)))
    assert taken.to_pylist() == ["细胞", "cell-1"]
