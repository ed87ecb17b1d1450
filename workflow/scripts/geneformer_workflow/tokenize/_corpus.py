"""Tokenize an open file chunk by chunk into parquet row groups: read, rank and write overlap.

The reader reads and checks chunk N+1 on its own thread while chunk N is ranked — by the calling
thread, or by ``threads`` worker threads (numpy releases the GIL in its loops and sorts) — and the
parquet sink encodes finished chunks on a third. Chunks are written in file order; at most
``threads + 2`` chunks and two row groups are held at once, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa

from geneformer_workflow.presets import CLS, EOS, Preset
from geneformer_workflow.progress import Progress
from geneformer_workflow.tokenize._arrow import numeric, strings
from geneformer_workflow.tokenize._gene_ranker import GeneRanker
from geneformer_workflow.tokenize._h5frame import ColumnParts
from geneformer_workflow.tokenize._parquet import DEFAULT_ENCODING, ParquetSink
from geneformer_workflow.tokenize.corpus_index import WRITE_ID_KEY
from geneformer_workflow.tokenize.h5ad import H5adCounts, InputError, RawChunk

log = logging.getLogger(__name__)

_SPLITS = strings(["train", "validation"])


class TokenBuffers:
    """int32 arrays for chunks' tokens, reused once the parquet writer is done with them.

    A fresh 16 MB array per chunk costs its page faults again (the kernel zeroes every page): ~5 % of
    the tokenizer's CPU. At most one array per chunk in flight exists.
    """

    def __init__(self) -> None:
        self._free: deque[np.ndarray] = deque()  # appends and pops are thread-safe

    def take(self, size: int) -> np.ndarray:
        """An array of at least ``size`` entries."""
        try:
            array = self._free.pop()
        except IndexError:
            array = None
        if array is None or array.size < size:
            array = np.empty(size + size // 4, dtype=np.int32)  # headroom: chunks differ in size
        return array

    def give(self, array: np.ndarray) -> None:
        """Return an array from :meth:`take` (its contents are no longer needed)."""
        self._free.append(array)


@dataclass
class ChunkCounts:
    """What a chunk contributes to the manifest's counts."""

    n_cells_empty: int = 0
    n_validation: int = 0
    counts_total: float = 0.0
    counts_in_vocabulary: float = 0.0

    def add(self, other: ChunkCounts) -> None:
        """Accumulate ``other`` (chunks are added in file order, so float sums do not depend on threads)."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def validation_mask(cell_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic train/validation split by cell id (a hash, so stable across runs and files)."""
    if fraction <= 0:
        return np.zeros(len(cell_ids), dtype=bool)
    limit = int(fraction * 2**64)
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(str(c).encode(), digest_size=8).digest() for c in cell_ids])
    return np.frombuffer(digests, dtype="<u8") < np.uint64(min(limit, 2**64 - 1))


class CorpusWriter:
    """Tokenizes rows of one open file into a parquet corpus; ``threads`` ranking threads (0: the caller's)."""

    def __init__(
        self,
        reader: H5adCounts,
        ranker: GeneRanker,
        keep: np.ndarray,
        preset: Preset,
        tokens: dict[str, int],
        obs_columns: list[str],
        *,
        threads: int = 0,
        encoding: str = DEFAULT_ENCODING,
    ) -> None:
        self.reader, self.ranker, self.keep, self.preset, self.tokens = reader, ranker, keep, preset, tokens
        self.threads = max(0, threads)  # 0: rank in the calling thread
        self.encoding = encoding  # of the token lists, see _parquet.encoding_options
        self.obs_table = _obs_table(reader, obs_columns)
        self.cell_ids = reader.cell_ids
        self.cell_id_array = strings(self.cell_ids)
        self.buffers = TokenBuffers()
        fixed = [("input_ids", pa.list_(pa.int32())), ("length", pa.int32()), ("cell_id", pa.string())]
        self.schema = pa.schema([*fixed, ("split", pa.string()), *self.obs_table.schema])

    def write(
        self, target: Path, validation_fraction: float, chunk_size: int, *, rows: tuple[int, int], write_id: str
    ) -> tuple[np.ndarray, ChunkCounts]:
        """Write the corpus of ``rows`` to ``target``; return the written cells' lengths and counts.

        ``target`` is a temporary path (the caller renames it with its side files); ``write_id`` goes into the
        file's metadata, so a manifest can be checked to describe this very file.
        """
        start, stop = rows
        progress = Progress(f"tokenize {self.reader.path.name}[{start}:{stop}]", stop - start, unit="cells")
        lengths: list[np.ndarray] = []
        counts = ChunkCounts()
        pending: deque[tuple[Future, int]] = deque()

        def finish(sink: ParquetSink) -> None:
            future, n_rows = pending.popleft()
            table, chunk_lengths, chunk_counts, buffer = future.result()
            counts.add(chunk_counts)
            if table is not None:
                sink.write(table, on_written=lambda: self.buffers.give(buffer))
                lengths.append(chunk_lengths)
            else:
                self.buffers.give(buffer)
            progress.update(n_rows)

        schema = self.schema.with_metadata({WRITE_ID_KEY: write_id.encode()})
        with (
            ParquetSink(target, schema, encoding=self.encoding) as sink,
            ThreadPoolExecutor(max(1, self.threads), "tokenize") as pool,
        ):
            # the chunks held at once: `threads` being ranked, one waiting (the reader adds its own)
            chunks = self.reader.iter_raw_chunks(chunk_size, start=start, stop=stop, buffers=self.threads + 1)
            for chunk in chunks:
                if self.threads:
                    future = pool.submit(self._chunk, chunk, validation_fraction)
                else:
                    future = Future()
                    future.set_result(self._chunk(chunk, validation_fraction))
                pending.append((future, chunk.stop - chunk.start))
                if len(pending) > self.threads:
                    finish(sink)
            while pending:
                finish(sink)
        progress.close()
        if not lengths and (start, stop) == (0, self.reader.n_obs):
            msg = f"{self.reader.path}: no cell has any vocabulary gene with a nonzero count; nothing to tokenize"
            raise InputError(msg)
        return (np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)), counts

    def _chunk(
        self, chunk: RawChunk, validation_fraction: float
    ) -> tuple[pa.Table | None, np.ndarray, ChunkCounts, np.ndarray]:
        """The row group of one chunk, its cells' lengths and counts, and the buffer its tokens are in.

        Runs on a ranking thread or the caller's; the buffer goes back to :attr:`buffers` once written.
        """
        row_sums = chunk.row_sums()
        n_counts = self.reader.n_counts(chunk, row_sums=row_sums)
        wanted = self.keep[chunk.start : chunk.stop]
        rows = wanted & (n_counts > 0)
        special = 2 * chunk.indptr.size if self.preset.special_tokens else 0
        buffer = self.buffers.take(chunk.data.size + special)  # more than the chunk's tokens
        ranked = self.ranker.rank(chunk, rows, n_counts, self.preset.max_genes, out=buffer[special:])
        counts = ChunkCounts(counts_total=float(row_sums[rows].sum()))
        in_vocabulary = ranked.counts_in_vocabulary
        counts.counts_in_vocabulary = counts.counts_total if in_vocabulary is None else in_vocabulary
        nonempty = ranked.lengths > 0
        counts.n_cells_empty = int((rows & ~nonempty).sum()) + int((wanted & ~rows).sum())
        local = np.flatnonzero(nonempty)
        if not local.size:
            return None, local, counts, buffer
        index = chunk.start + local
        tokens, lengths = ranked.tokens, ranked.lengths[local]
        if self.preset.special_tokens:  # moves the tokens to the buffer's start, which they never overtake
            tokens, lengths = _wrap_special(tokens, lengths, self.tokens[CLS], self.tokens[EOS], out=buffer)
        offsets = np.zeros(lengths.size + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        input_ids = pa.ListArray.from_arrays(numeric(offsets), numeric(tokens))
        is_val = validation_mask(self.cell_ids[index], validation_fraction)
        counts.n_validation = int(is_val.sum())
        take = numeric(index)
        split = _SPLITS.take(numeric(is_val.view(np.int8)))
        columns = [input_ids, numeric(lengths), self.cell_id_array.take(take), split]
        table = pa.Table.from_arrays([*columns, *self.obs_table.take(take).columns], schema=self.schema)
        return table, lengths, counts, buffer


def _obs_table(reader: H5adCounts, columns: list[str]) -> pa.Table:
    """The ``obs`` columns to keep, read one by one (categoricals become their labels as text)."""
    missing = [c for c in columns if c not in reader.obs_columns]
    if missing:
        msg = f"{reader.path}: obs has no column(s) {missing} to keep (available: {reader.obs_columns})"
        raise InputError(msg)
    return pa.table({c: _arrow_column(reader.obs_column(c)) for c in columns})


def _arrow_column(parts: ColumnParts) -> pa.Array:
    """An arrow array of a stored column: missing values are nulls, category labels are strings."""
    if parts.kind == "categorical":
        return strings(parts.categories.tolist()).take(numeric(parts.values.astype(np.int64), mask=parts.values < 0))
    if parts.values.dtype == object:
        if all(type(v) is str for v in parts.values.tolist()):
            return strings(parts.values.tolist())
        return pa.array(parts.values.tolist())  # mixed or missing values (a file read through anndata)
    if parts.values.dtype.kind in "SU":
        return strings(parts.values.tolist())
    return numeric(parts.values, mask=parts.mask)


def _wrap_special(
    tokens: np.ndarray, lengths: np.ndarray, cls: int, eos: int, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``<cls>`` before and ``<eos>`` after every row of the flat token array.

    ``out`` may hold ``tokens`` itself, at least ``2 * len(lengths)`` entries in: every row then moves
    towards the start, never onto tokens not yet moved (so each row's markers are written after it).
    """
    new_lengths = (lengths + 2).astype(np.int32)
    ends = np.cumsum(new_lengths)
    size = int(ends[-1]) if ends.size else 0
    out = np.empty(size, dtype=np.int32) if out is None else out[:size]
    source = 0
    for start, n in zip((ends - new_lengths + 1).tolist(), lengths.tolist(), strict=True):  # one copy per row
        out[start : start + n] = tokens[source : source + n]
        out[start - 1], out[start + n] = cls, eos
        source += n
    return out, new_lengths
