"""Which pyarrow reads the corpus, for each encoding of the token lists (``_parquet.ENCODINGS``).

- ``dictionary`` (the default): every pyarrow that ``datasets`` 3.x and 4.x accept (>= 15.0.0), checked with
  15.0.0, the lowest, in a light cached environment.
- ``byte_stream_split``: pyarrow >= 16 (15.0.0 fails on it), checked with 16.0.0.
- The package's writer runs on the project's pyarrow floor (pyproject: 16.0.0), and the newest pyarrow reads
  what it writes back to the same table.

The light environments come from PyPI once (skipped with pip's message when offline); the reads compare a
checksum of every value, so a reader that decodes differently fails too.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.tokenize._parquet import DEFAULT_ENCODING, ENCODINGS, ParquetSink, encoding_options

from ._light_venv import light_venv, run_checks
from .parquet_read_check import table_checksum

CHECK = Path(__file__).with_name("parquet_read_check.py")
PACKAGE = Path(__file__).resolve().parents[2] / "workflow" / "scripts"
# The lowest pyarrow `datasets` 3.x/4.x accept (docs: who can read the default corpus). Built for numpy 1.x.
READER_FLOOR = ["pyarrow==15.0.0", "numpy<2"]
# The project's floor (pyproject.toml), the first pyarrow that reads BYTE_STREAM_SPLIT integers.
PROJECT_FLOOR = ["pyarrow==16.0.0"]


def corpus_table(n_cells: int = 300, seed: int = 0) -> pa.Table:
    """A corpus-shaped table: token lists of 1 to 2,048 distinct ids of a V1-sized vocabulary, plus the columns."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[1, 2048], rng.integers(1, 2049, n_cells - 2)]).astype(np.int32)
    cells = [rng.permutation(np.arange(2, 25_426, dtype=np.int32))[:n] for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(cells))),
            "length": pa.array(lengths),
            "cell_id": pa.array([f"cell{i}" for i in range(n_cells)]),
            "split": pa.array(np.where(rng.random(n_cells) < 0.1, "validation", "train")),
        }
    )


def write_corpus(table: pa.Table, path: Path, encoding: str) -> Path:
    """Write ``table`` with the package's sink in row groups of 64 cells."""
    with ParquetSink(path, table.schema, encoding=encoding) as sink:
        for offset in range(0, table.num_rows, 64):
            sink.write(table.slice(offset, 64))
    return path


def read_results(output: str) -> dict[str, tuple[str, str]]:
    """``{file name: (status, checksum or message)}`` from ``parquet_read_check.py read``."""
    rows = [line.split(" ", 2) for line in output.splitlines()]
    return {Path(row[0]).name: (row[1], row[2]) for row in rows if len(row) == 3 and row[1] in ("ok", "error")}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_each_encoding_round_trips_with_its_column_encoding(tmp_path, encoding):
    table = corpus_table()
    path = write_corpus(table, tmp_path / "corpus.parquet", encoding)
    assert pq.read_table(path).equals(table)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert chunk.path_in_schema == "input_ids.list.element"
    expected = {"dictionary": ("RLE_DICTIONARY", "UNCOMPRESSED"), "byte_stream_split": ("BYTE_STREAM_SPLIT", "ZSTD")}
    assert expected[encoding][0] in chunk.encodings
    assert chunk.compression == expected[encoding][1]
    assert not chunk.is_stats_set  # min/max of token lists serve no query


def test_default_encoding_is_the_one_every_datasets_pyarrow_reads():
    assert DEFAULT_ENCODING == "dictionary"


def test_unknown_encoding_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown parquet encoding 'delta'.*dictionary, byte_stream_split"):
        encoding_options(pa.schema([("input_ids", pa.list_(pa.int32()))]), encoding="delta")


@pytest.mark.network
@pytest.mark.parametrize(
    ("requirements", "readable"),
    [(READER_FLOOR, {"dictionary"}), (PROJECT_FLOOR, set(ENCODINGS))],
    ids=["pyarrow-15.0.0", "pyarrow-16.0.0"],
)
def test_old_pyarrow_reads_exactly_the_encodings_we_document(tmp_path, requirements, readable):
    python = light_venv(requirements[0].replace("==", "-"), requirements)
    table = corpus_table()
    paths = [write_corpus(table, tmp_path / f"{encoding}.parquet", encoding) for encoding in ENCODINGS]
    output = run_checks(python, CHECK, "read", *map(str, paths))
    assert f"pyarrow {requirements[0].split('==')[1]}" in output, output
    results = read_results(output)
    assert set(results) == {p.name for p in paths}, output
    for encoding in ENCODINGS:
        status, detail = results[f"{encoding}.parquet"]
        if encoding in readable:
            assert (status, detail) == ("ok", table_checksum(table)), output
        else:
            assert status == "error" and "BYTE_STREAM_SPLIT" in detail, output


@pytest.mark.network
def test_writer_runs_on_the_project_pyarrow_floor(tmp_path):
    python = light_venv(PROJECT_FLOOR[0].replace("==", "-"), PROJECT_FLOOR)
    table = corpus_table()
    source = write_corpus(table, tmp_path / "source.parquet", DEFAULT_ENCODING)
    env = os.environ | {"PYTHONPATH": str(PACKAGE)}
    for encoding in ENCODINGS:
        target = tmp_path / f"{encoding}.parquet"
        command = [str(python), str(CHECK), "write", str(source), str(target), encoding]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "pyarrow 16.0.0 wrote" in result.stdout
        assert pq.read_table(target).equals(table)
