"""Planning without opening every input: cached cell counts, invalidated when a file changes; lists through files."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from geneformer_workflow.plan.inputs import CACHE_VERSION, cached_cell_counts, plan_row_ranges
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad
from geneformer_workflow.tokenize import h5ad
from geneformer_workflow.tokenize.h5ad import InputError, count_cells, header_cell_count

from .helpers import run_snakemake, write_config

GENES = [f"ENSG{i:011d}" for i in range(20)]


def write_h5ad(path, n_cells, *, matrix_format="csr", seed=0, where="X"):
    counts = synthetic_counts(n_cells, len(GENES), genes_per_cell=8, seed=seed).toarray()
    return write_counts_h5ad(path, counts, GENES, matrix_format=matrix_format, where=where)


@pytest.fixture
def reads(monkeypatch):
    """The files whose header planning opens (the real reader is still called)."""
    opened = []

    def counting(path, counts="X"):
        opened.append(os.path.basename(path))
        return header_cell_count(path, counts)

    monkeypatch.setattr(h5ad, "header_cell_count", counting)
    return opened


@pytest.mark.parametrize("matrix_format", ["csr", "csc", "dense"])
def test_header_count_equals_the_checked_count(tmp_path, matrix_format):
    path = write_h5ad(tmp_path / "a.h5ad", 13, matrix_format=matrix_format)
    assert header_cell_count(path) == count_cells(path) == 13


def test_unreadable_inputs_get_the_message_of_every_gfw_command(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(InputError) as expected:
        count_cells(bad)
    with pytest.raises(InputError) as planned:
        cached_cell_counts({"bad": str(bad)}, "X", tmp_path / "cache.json")
    assert str(planned.value) == str(expected.value)
    with pytest.raises(InputError, match="layers/nope"):
        header_cell_count(write_h5ad(tmp_path / "a.h5ad", 5), "layers/nope")


def test_unchanged_files_are_not_opened_again(tmp_path, reads):
    files = {f"s{i}": str(write_h5ad(tmp_path / f"s{i}.h5ad", 5 + i, seed=i, where="raw")) for i in range(3)}
    cache = tmp_path / "plan" / "cells.json"
    assert cached_cell_counts(files, "X", cache) == {"s0": 5, "s1": 6, "s2": 7}
    assert sorted(reads) == ["s0.h5ad", "s1.h5ad", "s2.h5ad"]
    reads.clear()
    assert cached_cell_counts(files, "X", cache) == {"s0": 5, "s1": 6, "s2": 7}
    assert reads == []
    assert cached_cell_counts(files, "raw", cache) == {"s0": 5, "s1": 6, "s2": 7}  # another count source: read
    assert len(reads) == 3


@pytest.mark.parametrize("change", ["rewritten", "replaced", "touched"])
def test_a_changed_file_is_read_again(tmp_path, reads, change):
    files = {"a": str(write_h5ad(tmp_path / "a.h5ad", 5)), "b": str(write_h5ad(tmp_path / "b.h5ad", 6))}
    cache = tmp_path / "cells.json"
    cached_cell_counts(files, "X", cache)
    reads.clear()
    if change == "rewritten":  # same path, new content (the size changes too)
        write_h5ad(tmp_path / "a.h5ad", 40)
        expected = 40
    elif change == "replaced":  # another file moved over it: a new inode
        os.replace(write_h5ad(tmp_path / "new.h5ad", 41), tmp_path / "a.h5ad")
        expected = 41
    else:  # same bytes, newer modification time
        stat = os.stat(files["a"])
        os.utime(files["a"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        expected = 5
    assert cached_cell_counts(files, "X", cache) == {"a": expected, "b": 6}
    assert reads == ["a.h5ad"]


@pytest.mark.parametrize("content", ["{broken", '{"version": 0, "files": {}}', '["a list"]', ""])
def test_a_damaged_or_foreign_cache_is_ignored_and_replaced(tmp_path, reads, content):
    files = {"a": str(write_h5ad(tmp_path / "a.h5ad", 5))}
    cache = tmp_path / "cells.json"
    cache.write_text(content)
    assert cached_cell_counts(files, "X", cache) == {"a": 5}
    assert reads == ["a.h5ad"]
    data = json.loads(cache.read_text())
    assert data["version"] == CACHE_VERSION and list(data["files"]) == [os.path.abspath(files["a"])]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_cache_keeps_only_the_current_inputs(tmp_path):
    a, b = str(write_h5ad(tmp_path / "a.h5ad", 5)), str(write_h5ad(tmp_path / "b.h5ad", 6))
    cache = tmp_path / "cells.json"
    cached_cell_counts({"a": a, "b": b}, "X", cache)
    cached_cell_counts({"b": b}, "X", cache)
    assert list(json.loads(cache.read_text())["files"]) == [os.path.abspath(b)]


def test_an_unwritable_cache_only_costs_the_reads(tmp_path):
    files = {"a": str(write_h5ad(tmp_path / "a.h5ad", 5))}
    blocker = tmp_path / "not a directory"
    blocker.write_text("")
    assert cached_cell_counts(files, "X", blocker / "cells.json") == {"a": 5}


def test_row_ranges_cover_every_cell_once():
    for n_cells, shard_cells in [(0, 3), (1, 3), (3, 3), (10, 3), (7, 100)]:
        ranges = plan_row_ranges(n_cells, shard_cells)
        covered = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        assert covered.tolist() == list(range(n_cells))
        assert all(0 < hi - lo <= shard_cells for lo, hi in ranges) or n_cells == 0
    with pytest.raises(ValueError, match="at least 1"):
        plan_row_ranges(5, 0)


@pytest.mark.slow
def test_the_workflow_plans_from_the_cache_and_replans_a_changed_input(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_h5ad(data / "one.h5ad", 30)
    write_h5ad(data / "two.h5ad", 10)
    write_config(tmp_path, inputs=["data/*.h5ad"], tokenize={"shard_cells": 20})
    result = run_snakemake(tmp_path, "-n", "--forceall", "results/tokenized/one/dataset.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard-0001.parquet" in result.stdout and "shard-0002.parquet" not in result.stdout
    cache = json.loads((tmp_path / ".snakemake/geneformer/input_cells.json").read_text())
    assert sorted(entry[-1] for entry in cache["files"].values()) == [10, 30]
    write_h5ad(data / "one.h5ad", 50)  # 3 shards now: the cached count of 30 cells must not be used
    result = run_snakemake(tmp_path, "-n", "--forceall", "results/tokenized/one/dataset.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard-0002.parquet" in result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_target_of_an_unknown_dataset_is_refused_by_name(tmp_path):
    write_config(tmp_path)
    result = run_snakemake(tmp_path, "-n", "results/tokenized/nope/shard-0000.parquet")
    assert result.returncode != 0
    assert "no input file is named nope.h5ad" in result.stdout + result.stderr


@pytest.mark.slow
def test_gene_medians_take_the_summaries_through_a_list_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(["first file", "second"]):
        write_h5ad(data / f"{name}.h5ad", 40 + i, seed=i)
    write_config(tmp_path, inputs=["data/*.h5ad"], qc={"min_genes": 1, "min_counts": 1})
    result = run_snakemake(tmp_path, "--cores", "2", "results/reference/gene_medians.tsv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listing = (tmp_path / "results/medians/summaries.txt").read_text().splitlines()
    assert listing == ["results/medians/first file.npz", "results/medians/second.npz"]
    from geneformer_workflow.tokenize.medians import ExpressionSummary, merge_summaries

    expected = merge_summaries(ExpressionSummary.load(tmp_path / p) for p in listing).medians()
    table = pd.read_csv(tmp_path / "results/reference/gene_medians.tsv", sep="\t", float_precision="round_trip")
    assert len(table) > 0
    pd.testing.assert_frame_equal(table, expected, check_exact=True)
