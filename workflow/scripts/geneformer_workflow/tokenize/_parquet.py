"""A parquet writer that encodes and compresses row groups on a background thread.

pyarrow releases the GIL while it encodes, so writing chunk N overlaps with tokenizing chunk N+1.
At most ``backlog`` row groups wait in memory, which keeps memory bounded.

Token lists (the bulk of a corpus) are written with one of two encodings (``benchmarks/parquet_encoding.py``
measures them; figures for 20,000 cells, 40 M tokens, pyarrow 26, 2-core machine):

- ``dictionary`` (default): parquet's dictionary encoding, uncompressed. The dictionary holds the distinct
  token ids of a row group (at most the vocabulary), and each token is its index bit-packed to
  ceil(log2(distinct ids)) bits: 15 bits for Geneformer's V1 and V2 vocabularies, 1.90 bytes per token.
  Compressing that shrinks nothing (zstd: -0.4 %) and costs write time. Every pyarrow that ``datasets``
  3.x/4.x accept reads it (>= 15; tested with 15.0.0 and 16.0.0).
- ``byte_stream_split``: BYTE_STREAM_SPLIT + zstd level 1 (token ids below 65,536 leave two of the four
  byte streams zero, which zstd removes almost for free): 1.85 bytes per token and about 0.1 CPU-s less per
  40 M tokens to write (0.35 s against 0.45 s; about 10 % of the CPU of a whole ``gfw tokenize`` run), but
  pyarrow < 16 cannot read it ("BYTE_STREAM_SPLIT only supports FLOAT and DOUBLE"). For corpora read only by
  pyarrow >= 16 (our trainer, up-to-date environments).

Reading both takes the same time within noise. The other columns use pyarrow's defaults (dictionary +
snappy). Min/max statistics of the token lists serve no query and are not written.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyarrow is imported where it is used: `gfw` imports this module for its choices only
    import pyarrow as pa

ENCODINGS = ("dictionary", "byte_stream_split")
DEFAULT_ENCODING = "dictionary"


class ParquetSink:
    """Append tables as row groups of one parquet file; ``close`` waits for every write and re-raises."""

    def __init__(
        self, path: str | Path, schema: pa.Schema, *, backlog: int = 2, encoding: str = DEFAULT_ENCODING
    ) -> None:
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(path, schema, **encoding_options(schema, encoding=encoding))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        self._pending: list[Future] = []
        self._backlog = backlog

    def write(self, table: pa.Table, on_written: Callable[[], None] | None = None) -> None:
        """Queue ``table`` as the next row group (blocks while ``backlog`` writes are pending).

        ``on_written`` is called once the table has been encoded (or its write failed): its memory may
        then be reused.
        """
        while len(self._pending) >= self._backlog:
            self._pending.pop(0).result()
        future = self._pool.submit(self._writer.write_table, table)
        if on_written is not None:
            future.add_done_callback(lambda _: on_written())
        self._pending.append(future)

    def close(self) -> None:
        """Finish all writes and the file footer; the first failed write's error is raised."""
        try:
            while self._pending:
                self._pending.pop(0).result()
        except BaseException:
            self._abort()
            raise
        self._pool.shutdown(wait=True)
        self._writer.close()

    def _abort(self) -> None:
        """Stop after a failure, keeping the original error (the partial file is discarded by the caller)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        try:
            self._writer.close()
        except Exception:
            pass  # the failed write's error is the one being raised; a footer error here is a consequence

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def encoding_options(schema: pa.Schema, *, encoding: str = DEFAULT_ENCODING) -> dict:
    """``pyarrow.parquet.ParquetWriter`` options for ``schema``: list columns as ``encoding``, the rest defaults.

    Args:
        schema: The table's schema; its list columns (the token lists) get ``encoding``.
        encoding: One of :data:`ENCODINGS` (see the module docstring for what each costs and who reads it).

    Raises:
        ValueError: an unknown ``encoding``.

    >>> import pyarrow as pa
    >>> encoding_options(pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())]))["compression"]
    {'length': 'snappy', 'input_ids.list.element': 'none'}
    """
    import pyarrow as pa

    if encoding not in ENCODINGS:
        msg = f"unknown parquet encoding {encoding!r} for the token lists; choose one of {', '.join(ENCODINGS)}"
        raise ValueError(msg)
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    others = [f.name for f in schema if f.name not in lists]
    leaves = [f"{name}.list.element" for name in lists]
    defaults = {"write_statistics": others, "compression": dict.fromkeys(others, "snappy")}
    if encoding == "dictionary":
        # Bit-packed dictionary indices are already dense: compression would spend time for nothing.
        return defaults | {
            "use_dictionary": others + leaves,
            "compression": defaults["compression"] | dict.fromkeys(leaves, "none"),
        }
    return defaults | {
        "use_dictionary": others,
        "column_encoding": dict.fromkeys(leaves, "BYTE_STREAM_SPLIT"),
        "compression": defaults["compression"] | dict.fromkeys(leaves, "zstd"),
        "compression_level": dict.fromkeys(leaves, 1),
    }
