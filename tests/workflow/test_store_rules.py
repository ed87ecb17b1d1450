"""The training store in the DAG: CPU jobs build it per shard; the trainer gets one path, never the shard list."""

from __future__ import annotations

import re

from .helpers import DEMO, run_snakemake, write_config


def test_the_pretraining_command_names_the_store_not_the_shards(tmp_path):
    for name in ("donor_a", "donor_b"):
        (tmp_path / f"{name}.h5ad").symlink_to(DEMO)
    write_config(tmp_path, inputs=[str(tmp_path / "*.h5ad")], tokenize={"shard_cells": 50})
    result = run_snakemake(tmp_path, "-n", "-p", "--forceall", timeout=300)
    assert result.returncode == 0, result.stderr
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE))
    assert jobs["tokenize_dataset"] == "8"  # 2 files x 4 shards of 50 cells, each job writing its store part too
    parts = [line for line in result.stdout.splitlines() if " store part " in line]
    assert len(parts) == 8 and all(" tokenize " in c for c in parts)
    assert sorted(re.search(r"-o (\S+) --vocab-dir", c).group(1) for c in parts) == [
        f"results/store/{name}/shard-{i:04d}.json" for name in ("donor_a", "donor_b") for i in range(4)
    ]
    assert jobs["store_index"] == jobs["list_store_parts"] == "1"
    commands = [line for line in result.stdout.splitlines() if "geneformer_workflow train" in line]
    assert commands, result.stdout
    assert all("'data.store=" in c and "results/store/store.json" in c and "tokenized" not in c for c in commands)
    index = [line for line in result.stdout.splitlines() if " store index " in line]
    assert index and all("--parts-list results/store/parts.txt" in c and "shard-" not in c for c in index)
