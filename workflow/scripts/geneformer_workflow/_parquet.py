"""A parquet writer that encodes and compresses row groups on a background thread.

pyarrow releases the GIL while it encodes, so writing chunk N overlaps with tokenizing chunk N+1.
At most ``backlog`` row groups wait in memory, which keeps memory bounded.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetSink:
    """Append tables as row groups of one parquet file; ``close`` waits for every write and re-raises."""

    def __init__(self, path: str | Path, schema: pa.Schema, *, backlog: int = 2, compression: str = "snappy") -> None:
        # Min/max statistics of list columns (the token ids) cost ~15% of the encoding and serve no query.
        # snappy, not zstd: dictionary-encoded token ids are already bit-packed (zstd saves <1% of the file)
        # and zstd costs ~15% more encoding CPU, a third of the tokenizer's work.
        statistics = [f.name for f in schema if not pa.types.is_list(f.type)]
        self._writer = pq.ParquetWriter(path, schema, compression=compression, write_statistics=statistics)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        self._pending: list[Future] = []
        self._backlog = backlog

    def write(self, table: pa.Table) -> None:
        """Queue ``table`` as the next row group (blocks while ``backlog`` writes are pending)."""
        while len(self._pending) >= self._backlog:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._writer.write_table, table))

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
