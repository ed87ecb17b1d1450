"""Read parquet corpora (or rewrite them with the package's writer) under another pyarrow; print checksums.

Standard library + pyarrow only, so it runs in a light environment with an old pyarrow:

    python parquet_read_check.py read FILE [FILE ...]            # "FILE ok SHA256" or "FILE error MESSAGE"
    python parquet_read_check.py write SRC DST ENCODING          # rewrite SRC with ParquetSink (PYTHONPATH: package)

The checksum covers every column's values in order (token lists, lengths, cell ids), so a reader that decodes
anything differently is caught, not only one that fails.
"""

from __future__ import annotations

import hashlib
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def table_checksum(table: pa.Table) -> str:
    """sha256 over the columns' names and values as Python objects (independent of chunking and of how a
    pyarrow version prints types: ``list<item: int32>`` or ``list<element: int32>``)."""
    digest = hashlib.sha256()
    for name in table.column_names:
        digest.update(f"{name}:{table.column(name).to_pylist()}".encode())
    return digest.hexdigest()


def read(paths: list[str]) -> None:
    """One line per file: ``ok <checksum>`` or ``error <message>``."""
    print(f"pyarrow {pa.__version__}")
    for path in paths:
        try:
            print(path, "ok", table_checksum(pq.read_table(path)))
        except Exception as err:  # the message is the result: older readers fail with OSError or ArrowException
            print(path, "error", f"{type(err).__name__}: {err}".replace("\n", " "))


def write(source: str, target: str, encoding: str) -> None:
    """Rewrite ``source`` with the package's ``ParquetSink`` in row groups of 64 cells."""
    from geneformer_workflow.tokenize._parquet import ParquetSink

    table = pq.read_table(source)
    with ParquetSink(target, table.schema, encoding=encoding) as sink:
        for offset in range(0, table.num_rows, 64):
            sink.write(table.slice(offset, 64))
    print(f"pyarrow {pa.__version__} wrote {target}")


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command == "read":
        read(args)
    elif command == "write" and len(args) == 3:
        write(*args)
    else:
        print(__doc__)
        sys.exit(2)
