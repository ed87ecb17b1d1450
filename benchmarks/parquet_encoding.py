"""Parquet encodings of the corpus's token lists: write time, size, read time, and which pyarrow reads them.

Takes a tokenized corpus shard (default: tokenizes a seeded synthetic file first, 20,000 cells x 20,000 genes,
~2,000 tokens per cell, Ensembl ids and medians from Geneformer's V1 dictionaries), rewrites its table with each
encoding in row groups of 2,048 cells (the tokenizer's chunk size), and prints side by side: CPU seconds to
encode and write (what the tokenizer pays, on its writer thread), file size and bytes per token, and seconds to
read the whole table back (``pyarrow.parquet.read_table``, as ``datasets.Dataset.from_parquet`` does). Each
figure is the median of ``--repeat`` runs, the variants interleaved (the machine may be shared: compare numbers
from one run only). ``--readers`` names Python interpreters with other pyarrow versions; each must read every
file back to the same tokens (a checksum) or the table shows its error.

    python benchmarks/parquet_encoding.py [--corpus shard.parquet] [--repeat 5] [--readers /venv-pa15/bin/python]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
sys.path.insert(0, str(HERE))
from geneformer_workflow.tokenize._parquet import ENCODINGS, encoding_options  # noqa: E402

ROW_GROUP = 2048

# A reader's check: the pyarrow version, then the sha256 of all token ids (little-endian int32, in order).
READ_CHECK = """
import hashlib, sys
import pyarrow as pa, pyarrow.parquet as pq
ids = pq.read_table(sys.argv[1], columns=["input_ids"]).column("input_ids").combine_chunks()
values = ids.flatten().cast(pa.int32()).to_numpy(zero_copy_only=False).astype("<i4")
print(pa.__version__, hashlib.sha256(values.tobytes()).hexdigest())
"""


def variants() -> dict[str, Callable[[pa.Schema], dict]]:
    """Writer options by name: the package's encodings, then alternatives for reference."""
    table: dict[str, Callable[[pa.Schema], dict]] = {
        name: (lambda schema, name=name: encoding_options(schema, encoding=name)) for name in ENCODINGS
    }
    table["dictionary + zstd 1"] = lambda schema: _token_lists(schema, "dictionary", "zstd", 1)
    table["plain + zstd 1"] = lambda schema: _token_lists(schema, "PLAIN", "zstd", 1)
    table["pyarrow defaults (dictionary + snappy)"] = lambda schema: {}
    return table


def _token_lists(schema: pa.Schema, encoding: str, compression: str, level: int) -> dict:
    """The package's dictionary options with another encoding or compression of the token lists."""
    options = encoding_options(schema, encoding="dictionary")
    leaf = "input_ids.list.element"
    options["compression"] = options["compression"] | {leaf: compression}
    options["compression_level"] = {leaf: level}
    if encoding != "dictionary":
        options["use_dictionary"] = [c for c in options["use_dictionary"] if c != leaf]
        options["column_encoding"] = {leaf: encoding}
    return options


def checksum(path: Path) -> str:
    """sha256 of the token ids, computed as the readers compute it."""
    ids = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    values = ids.flatten().cast(pa.int32()).to_numpy(zero_copy_only=False).astype("<i4")
    return hashlib.sha256(values.tobytes()).hexdigest()


def write(table: pa.Table, path: Path, options: dict) -> float:
    """CPU seconds of writing ``table`` to ``path`` in row groups of ``ROW_GROUP`` cells (single thread)."""
    start = time.process_time()
    with pq.ParquetWriter(path, table.schema, **options) as writer:
        for offset in range(0, table.num_rows, ROW_GROUP):
            writer.write_table(table.slice(offset, ROW_GROUP))
    return time.process_time() - start


def read(path: Path) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) of reading the whole file back."""
    wall, cpu = time.perf_counter(), time.process_time()
    pq.read_table(path)
    return time.perf_counter() - wall, time.process_time() - cpu


def readable_by(python: str, path: Path, expected: str) -> str:
    """``ok`` when ``python`` reads ``path`` to the expected tokens, else the error's last line."""
    result = subprocess.run([python, "-c", READ_CHECK, str(path)], capture_output=True, text=True, check=False)
    lines = (result.stdout + result.stderr).strip().splitlines() or ["no output"]
    if result.returncode == 0 and lines[-1].split()[-1] == expected:
        return "ok"
    return lines[-1][:60]


def reader_version(python: str) -> str:
    """The pyarrow version of interpreter ``python``."""
    command = [python, "-c", "import pyarrow; print(pyarrow.__version__)"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def synthetic_corpus(workdir: Path, cells: int, dictionaries: Path) -> Path:
    """Tokenize a seeded synthetic file with ``gfw tokenize`` (the V1 dictionaries); returns the shard."""
    from make_synthetic import write_synthetic

    h5ad, shard = workdir / f"synthetic_{cells}.h5ad", workdir / f"synthetic_{cells}.parquet"
    if not shard.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        tokens = dictionaries / "v1" / "token_dictionary_gc30M.pkl"
        write_synthetic(h5ad, cells, 20_000, 2_000, tokens)
        command = [sys.executable, "-m", "geneformer_workflow", "tokenize", str(h5ad), str(shard)]
        command += ["--token-dictionary", str(tokens), "--preset", "v1"]
        command += ["--gene-medians", str(dictionaries / "v1" / "gene_median_dictionary_gc30M.pkl")]
        env = os.environ | {"PYTHONPATH": str(REPO / "workflow" / "scripts")}
        subprocess.run(command, check=True, env=env)
    return shard


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="a tokenized shard (default: tokenize a synthetic file)")
    parser.add_argument("--cells", type=int, default=20_000, help="cells of the synthetic file (default 20,000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of every write and read; medians shown")
    parser.add_argument("--readers", nargs="*", default=[], help="python interpreters with other pyarrow versions")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gfw-bench-parquet")
    parser.add_argument("--dictionaries", type=Path, default=REPO.parent / "shared" / "geneformer-dictionaries")
    args = parser.parse_args()

    shard = args.corpus or synthetic_corpus(args.workdir, args.cells, args.dictionaries)
    table = pq.read_table(shard)
    n_tokens = len(table.column("input_ids").combine_chunks().flatten())
    args.workdir.mkdir(parents=True, exist_ok=True)
    options = {name: make(table.schema) for name, make in variants().items()}
    paths = {name: args.workdir / f"variant_{i}.parquet" for i, name in enumerate(options)}
    writes: dict[str, list[float]] = {name: [] for name in options}
    reads: dict[str, list[tuple[float, float]]] = {name: [] for name in options}
    for _ in range(args.repeat):
        for name in options:
            writes[name].append(write(table, paths[name], options[name]))
            reads[name].append(read(paths[name]))
    expected = checksum(shard)
    versions = [reader_version(python) for python in args.readers]

    print(f"{shard}: {table.num_rows:,} cells, {n_tokens:,} tokens; pyarrow {pa.__version__} writes and reads")
    print(f"medians of {args.repeat} runs; write: one thread; read: read_table, all columns, pyarrow's threads\n")
    header = ["encoding", "write CPU s", "MB", "bytes/token", "read wall s", "read CPU s"]
    header += [f"pyarrow {v} reads" for v in versions]
    rows = []
    for name in options:
        size = paths[name].stat().st_size
        rows.append(
            [
                name,
                f"{statistics.median(writes[name]):.2f}",
                f"{size / 1e6:.1f}",
                f"{size / n_tokens:.2f}",
                f"{statistics.median(wall for wall, _ in reads[name]):.2f}",
                f"{statistics.median(cpu for _, cpu in reads[name]):.2f}",
                *[readable_by(python, paths[name], expected) for python in args.readers],
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
