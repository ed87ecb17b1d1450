"""Shell rules quote every path and option: an input file, dataset name and gene id column with spaces work."""

from __future__ import annotations

import json

import anndata as ad
import pytest

from .helpers import DEMO, run_snakemake, write_config

pytestmark = pytest.mark.slow


def test_a_file_and_a_var_column_with_spaces_are_tokenized(tmp_path):
    workdir = tmp_path / "my project"
    data = workdir / "data" / "with space"
    data.mkdir(parents=True)
    adata = ad.read_h5ad(DEMO)
    adata = adata[:60].copy()
    adata.var["gene symbol"] = adata.var_names.astype(str)
    adata.var_names = [f"row {i}" for i in range(adata.n_vars)]  # the index is no gene id: the column must be used
    adata.write_h5ad(data / "my pbmc.h5ad")
    write_config(
        workdir,
        inputs=["data/with space/my pbmc.h5ad"],
        gene_id_key="gene symbol",
        gene_mapping="GRCh38",
        qc={"min_genes": 10},
    )
    target = "results/tokenized/my pbmc/dataset.json"
    result = run_snakemake(workdir, "--cores", "2", target)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    index = json.loads((workdir / target).read_text())
    assert index["n_cells"] > 0 and index["shards"] == ["shard-0000.parquet"]
    assert (workdir / "logs" / "qc_dataset" / "my pbmc.log").stat().st_size > 0
    assert not (workdir / "logs" / "qc_dataset" / "my").exists()
