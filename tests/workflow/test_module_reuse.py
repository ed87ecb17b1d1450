from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .helpers import DEMO, REPO

pytestmark = pytest.mark.slow

TOKENIZATION_RULES = ", ".join(
    [
        "qc_dataset",
        "list_expression_summaries",
        "compute_gene_medians",
        "build_vocabulary",
        "tokenize_dataset",
    ]
)


def test_tokenization_rules_run_inside_another_workflow_via_module(tmp_path):
    (tmp_path / "config.yaml").write_text(
        json.dumps({"geneformer": {"inputs": [str(DEMO)], "tokenize": {"preset": "v2"}}})
    )
    (tmp_path / "Snakefile").write_text(
        f"""configfile: "config.yaml"


module geneformer:
    snakefile:
        "{REPO / "workflow" / "Snakefile"}"
    config:
        config["geneformer"]


use rule {TOKENIZATION_RULES} from geneformer as gf_*


rule all:
    input:
        "results/tokenized/pbmc_5k_protein_v3/shard-0000.parquet",
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((tmp_path / "results/tokenized/pbmc_5k_protein_v3/shard-0000.manifest.json").read_text())
    assert manifest["preset"] == "v2"
    assert manifest["n_cells"] > 0
    # the merged jobs: QC wrote the expression summary, tokenization the shard's training-store part
    assert (tmp_path / "results/medians/pbmc_5k_protein_v3.npz").is_file()
    part = json.loads((tmp_path / "results/store/pbmc_5k_protein_v3/shard-0000.json").read_text())
    assert part["source"] == "shard-0000.parquet"
    assert part["train"]["cells"] + part["validation"]["cells"] == manifest["n_cells"]
    assert not (tmp_path / "results/pretrain").exists()
