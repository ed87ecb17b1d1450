"""Parquet corpus → one flat, memory-mapped token array per split.

Parquet is compressed, so random access to single cells would decode whole row groups.
Instead each node converts the corpus once into two ``.npy`` files per split, a flat
``int32`` token array and ``int64`` offsets, under ``data.cache_dir/<fingerprint>/``, and
every rank memory-maps them (the page cache holds one copy per node). The fingerprint
covers each file's absolute path, size and modification time, so a changed corpus gets a
new cache. The cache is written into a temporary directory and renamed, so a killed job
never leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("input_ids", "length")
CACHE_FORMAT = 1  # bump when the cache layout changes


@dataclass(frozen=True)
class TokenStore:
    """Cells of one split as a flat token array plus offsets (cell i = tokens[offsets[i]:offsets[i+1]])."""

    tokens: np.ndarray  # (total_tokens,) int32, usually a read-only memmap
    offsets: np.ndarray  # (n_cells + 1,) int64

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def lengths(self) -> np.ndarray:
        """(n_cells,) int64 cell lengths in tokens."""
        return np.diff(self.offsets)

    def cell(self, index: int) -> np.ndarray:
        """Token ids of cell ``index`` (a view)."""
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


def resolve_corpus_files(spec: str | list[str] | tuple[str, ...]) -> list[Path]:
    """Expand ``data.corpus`` (parquet files, directories of them, or globs) in the given order.

    Directories and globs expand to their ``*.parquet`` files in sorted order; a file listed
    twice is kept once.
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for entry in entries:
        entry = str(entry)
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob("*.parquet"))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
        if not found:
            msg = f"data.corpus entry {entry!r} matches no parquet file; give files, directories or globs"
            raise ValueError(msg)
        files.extend(p.resolve() for p in found)
    return list(dict.fromkeys(files))


def corpus_fingerprint(files: list[Path], split_values: dict[str, str]) -> str:
    """A short hash of the files' paths, sizes and mtimes plus the split names."""
    hasher = hashlib.sha256(f"format={CACHE_FORMAT};splits={sorted(split_values.items())}".encode())
    for path in files:
        stat = path.stat()
        hasher.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:16]


def _split_mask(table: pa.Table | pa.RecordBatch, split: str) -> pa.Array | None:
    """Rows of ``split``; None means every row (a corpus without a ``split`` column is all train)."""
    if "split" not in table.schema.names:
        return None
    return pc.fill_null(pc.equal(table.column("split"), split), False)


def _count_split(files: list[Path], split: str, keep_all_without_column: bool) -> tuple[int, int]:
    """First pass: (cells, tokens) of ``split`` from the cheap ``length``/``split`` columns."""
    n_cells = n_tokens = 0
    for path in files:
        schema = pq.read_schema(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            msg = f"corpus file {path} lacks column(s) {missing}; is it a tokenizer output?"
            raise ValueError(msg)
        columns = ["length", "split"] if "split" in schema.names else ["length"]
        table = pq.read_table(path, columns=columns)
        mask = _split_mask(table, split)
        if mask is None and not keep_all_without_column:
            continue
        lengths = table.column("length") if mask is None else table.column("length").filter(mask)
        n_cells += len(lengths)
        n_tokens += int(pc.sum(lengths).as_py() or 0)
    return n_cells, n_tokens


def _fill_split(
    files: list[Path], split: str, keep_all_without_column: bool, tokens: np.ndarray, offsets: np.ndarray
) -> int:
    """Second pass: stream ``input_ids`` batch by batch into the preallocated arrays; returns the max id."""
    cell = token = 0
    max_id = -1
    offsets[0] = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        columns = (
            ["input_ids", "length", "split"] if "split" in parquet.schema_arrow.names else ["input_ids", "length"]
        )
        for batch in parquet.iter_batches(columns=columns, batch_size=4096):
            mask = _split_mask(batch, split)
            if mask is None and not keep_all_without_column:
                break
            if mask is not None:
                batch = batch.filter(mask)
            ids = batch.column("input_ids")
            list_lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
            declared = batch.column("length").to_numpy(zero_copy_only=False).astype(np.int64)
            bad = int((list_lengths != declared).sum())
            if bad:
                msg = f"corpus file {path}: {bad} rows have `length` != len(input_ids); re-run the tokenizer"
                raise ValueError(msg)
            flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
            tokens[token : token + flat.shape[0]] = flat
            max_id = max(max_id, int(flat.max())) if flat.shape[0] else max_id
            offsets[cell + 1 : cell + 1 + len(list_lengths)] = token + np.cumsum(list_lengths)
            cell += len(list_lengths)
            token += flat.shape[0]
    assert cell == offsets.shape[0] - 1 and token == tokens.shape[0], "corpus changed while it was read"
    return max_id


def _write_split(files: list[Path], split: str, role: str, out_dir: Path) -> dict[str, int]:
    """Write ``<role>.tokens.npy`` and ``<role>.offsets.npy`` for the rows whose ``split`` is ``split``."""
    keep_all = role == "train"
    n_cells, n_tokens = _count_split(files, split, keep_all)
    tokens = np.lib.format.open_memmap(out_dir / f"{role}.tokens.npy", mode="w+", dtype=np.int32, shape=(n_tokens,))
    offsets = np.zeros(n_cells + 1, dtype=np.int64)  # 8 bytes per cell: small enough to keep in memory
    max_id = _fill_split(files, split, keep_all, tokens, offsets)
    tokens.flush()
    np.save(out_dir / f"{role}.offsets.npy", offsets)
    return {"cells": n_cells, "tokens": n_tokens, "max_token_id": max_id}


def build_cache(files: list[Path], cache_root: Path, splits: dict[str, str]) -> Path:
    """Convert the corpus into ``cache_root/<fingerprint>/`` unless it is already there.

    Args:
        files: Parquet files in corpus order.
        cache_root: ``data.cache_dir``.
        splits: Role → value of the ``split`` column, e.g. ``{"train": "train", "validation": "validation"}``.
            Rows of a file without a ``split`` column all count as train.

    Returns:
        The complete cache directory.
    """
    final = cache_root / corpus_fingerprint(files, splits)
    if (final / "manifest.json").is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {"files": [str(p) for p in files], "splits": splits}
    for role, value in splits.items():
        manifest[role] = _write_split(files, value, role, tmp)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:  # another node or rank finished the same cache first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def open_split(cache_dir: Path, role: str, *, vocab_size: int) -> TokenStore:
    """Memory-map one split of a complete cache, checking its ids fit the vocabulary."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    max_id = manifest[role]["max_token_id"]
    if max_id >= vocab_size:
        msg = (
            f"the corpus ({manifest['files'][0]} ...) holds token id {max_id} but the token dictionary has "
            f"{vocab_size} ids; data.vocab_dir must be the vocabulary the corpus was tokenized with"
        )
        raise ValueError(msg)
    tokens = np.load(cache_dir / f"{role}.tokens.npy", mmap_mode="r")
    offsets = np.load(cache_dir / f"{role}.offsets.npy")
    return TokenStore(tokens=tokens, offsets=offsets)
