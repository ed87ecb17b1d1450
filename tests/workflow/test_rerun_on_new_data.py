"""A workflow rerun on changed data never continues the old model (issue 15, cases 3 and 11).

The input keeps its cells, genes and per-cell totals but its counts move between genes: Snakemake re-tokenizes,
and pretraining must refuse the old checkpoint with the way to start over instead of "resuming" and exporting
the old model. Following that advice trains a new model from step 0.
"""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from .helpers import DEMO, run_snakemake, write_config

pytestmark = pytest.mark.slow

OVERRIDES = ["training.max_steps=2", "checkpoint.save_every=2", "logging.log_every=1", "logging.eval_every=2"]
FINAL = "results/pretrain/sanity/final.json"


def reverse_each_cells_counts(path) -> None:
    """The same cells, genes and totals; each cell's counts in reverse order over its detected genes."""
    adata = ad.read_h5ad(path)
    counts = sp.csr_matrix(adata.X)
    for row in range(counts.shape[0]):
        start, stop = counts.indptr[row], counts.indptr[row + 1]
        counts.data[start:stop] = counts.data[start:stop][::-1].copy()
    assert np.array_equal(np.asarray(counts.sum(1)), np.asarray(sp.csr_matrix(adata.X).sum(1)))
    adata.X = counts
    adata.write_h5ad(path)


def test_changed_counts_refuse_the_old_checkpoint_and_moving_it_away_starts_over(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DEMO, data / "cells.h5ad")
    write_config(tmp_path, inputs=["data/cells.h5ad"], pretrain={"nproc_per_node": 1, "overrides": OVERRIDES})
    first = run_snakemake(tmp_path, "--cores", "2", FINAL)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    reverse_each_cells_counts(data / "cells.h5ad")
    second = run_snakemake(tmp_path, "--cores", "2", FINAL)
    assert second.returncode != 0
    log = (tmp_path / "logs" / "pretrain_model" / "sanity.log").read_text()
    assert "CheckpointMismatchError: cannot resume from" in log and "it was trained on other data" in log, log[-3000:]
    assert "move the old run away" in log
    assert (tmp_path / "results/pretrain/sanity/checkpoints/step_2").is_dir()  # the old run is kept

    (tmp_path / "results/pretrain/sanity").rename(tmp_path / "results/pretrain/sanity.old")
    third = run_snakemake(tmp_path, "--cores", "2", FINAL)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert json.loads((tmp_path / FINAL).read_text())["step"] == 2
    assert "resumed from" not in (tmp_path / "logs" / "pretrain_model" / "sanity.log").read_text()
