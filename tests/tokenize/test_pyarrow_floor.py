"""The package's corpus commands run on the pyarrow floor that pyproject declares, and give the same results.

``tests/tokenize/test_parquet_readers.py`` checks which pyarrow reads each encoding and runs the parquet writer on
16.0.0; this test runs the real commands that write and read the corpus (``gfw tokenize``, ``gfw index``,
``gfw store build``, the training store's reader of parquet) under pyarrow 16.0.0, put first on ``PYTHONPATH`` of
the project's own interpreter (a cached ``pip install --no-deps --target`` directory; skipped with pip's message
when offline), and compares every output with the same commands under the installed pyarrow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from packaging.version import Version

from ._light_venv import light_overlay

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "workflow" / "scripts"
DEMO = REPO / "resources" / "demo" / "pbmc_5k_protein_v3.h5ad"
PROJECT_FLOOR = "16.0.0"  # pyproject.toml: pyarrow>=16


def pyproject_pyarrow_floor() -> str:
    """The ``pyarrow>=X`` lower bound of pyproject.toml's dependencies."""
    match = re.search(r'"pyarrow>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml declares no pyarrow>= floor"
    return match.group(1)


def run_corpus_commands(out: Path, pythonpath: list[Path]) -> str:
    """medians, vocab, two tokenize shards, index and store build under ``pythonpath``; returns pyarrow's version."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, PACKAGE]))}

    def gfw(*args: str | Path) -> None:
        command = [sys.executable, "-m", "geneformer_workflow", *map(str, args)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert result.returncode == 0, f"gfw {args[0]} failed:\n{result.stdout}{result.stderr}"

    gfw("medians", DEMO, "-o", out / "medians.tsv")
    gfw("vocab", out / "medians.tsv", "-o", out / "vocab", "--preset", "v2")
    common = ["--token-dictionary", out / "vocab", "--gene-medians", out / "medians.tsv", "--preset", "v2"]
    gfw("tokenize", DEMO, out / "ds" / "b.parquet", *common, "--rows", "120:200", "--validation-fraction", "0.2")
    gfw("tokenize", DEMO, out / "ds" / "a.parquet", *common, "--rows", "0:120", "--validation-fraction", "0.2")
    gfw("index", out / "ds" / "b.parquet", out / "ds" / "a.parquet", "-o", out / "ds" / "dataset.json")
    gfw("store", "build", out / "ds" / "dataset.json", "-o", out / "store", "--vocab-dir", out / "vocab")
    version = [sys.executable, "-c", "import pyarrow; print(pyarrow.__version__)"]
    return subprocess.run(version, capture_output=True, text=True, env=env, check=True).stdout.strip()


def test_the_floor_tested_here_is_the_one_pyproject_declares():
    assert Version(pyproject_pyarrow_floor()) == Version(PROJECT_FLOOR)


@pytest.mark.network
def test_corpus_commands_on_the_pyarrow_floor_give_the_same_outputs(tmp_path):
    overlay = light_overlay(f"pyarrow-{PROJECT_FLOOR}", [f"pyarrow=={PROJECT_FLOOR}"])
    floor, newest = tmp_path / "floor", tmp_path / "newest"
    assert run_corpus_commands(floor, [overlay]) == PROJECT_FLOOR
    run_corpus_commands(newest, [])

    for shard in ("a.parquet", "b.parquet"):
        assert pq.read_table(floor / "ds" / shard).equals(pq.read_table(newest / "ds" / shard)), shard
    # Everything but the parquet files (whose footer names the writing pyarrow) is byte-identical.
    compared = [p.relative_to(newest) for p in sorted(newest.rglob("*")) if p.is_file() and p.suffix != ".parquet"]
    assert {p.relative_to(floor) for p in floor.rglob("*") if p.is_file() and p.suffix != ".parquet"} == set(compared)
    assert any(p.parts[0] == "store" for p in compared)
    assert Path("ds", "dataset.lengths.pkl") in compared
    for path in compared:
        assert (floor / path).read_bytes() == (newest / path).read_bytes(), path
