"""Parquet corpus → one flat, memory-mapped token array per split.

Parquet is compressed, so random access to single cells would decode whole row groups.
Instead each node converts the corpus once into two ``.npy`` files per split, a flat
``int32`` token array and ``int64`` offsets, under ``data.cache_dir/<fingerprint>/``, and
every rank memory-maps them (the page cache holds one copy per node). The fingerprint
covers each file's absolute path, size and modification time, so a changed corpus gets a
new cache. The cache is written into a temporary directory ``.tmp-<fingerprint>-<host>-<pid>``,
fsynced and renamed, so a killed job never leaves a half-written cache that looks complete; the
temporary directories of builds on this host whose process is gone are removed before the next
build. A build that cannot write (disk full, quota) raises :class:`CacheWriteError` naming the
directory and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .._atomic import fsync_dir, fsync_tree, pid_alive
from .._io import InputError
from ..corpus_index import resolve_corpus_inputs
from .checkpoint import describe_write_error

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("input_ids", "length")
CACHE_FORMAT = 2  # bump when the cache layout changes (2: content checksums)
_TMP_DIR = re.compile(r"^\.tmp-(?P<fingerprint>[0-9a-f]{16})-(?P<host>.+)-(?P<pid>\d+)$")


class CacheWriteError(OSError):
    """The token cache could not be written; the message names the directory, the problem and the fix."""


@dataclass(frozen=True)
class TokenStore:
    """Cells of one split as a flat token array plus offsets (cell i = tokens[offsets[i]:offsets[i+1]])."""

    tokens: np.ndarray  # (total_tokens,) int32, usually a read-only memmap
    offsets: np.ndarray  # (n_cells + 1,) int64
    content_sha256: str = ""  # content_sha256(tokens, offsets); "" when not computed

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
    """Expand ``data.corpus`` into absolute parquet paths in the given order.

    Entries may be parquet files, ``dataset.json`` indexes (``gfw index``) or directories holding one (exactly
    the shards listed), other directories or globs (their ``*.parquet`` files, sorted); see
    :func:`~geneformer_workflow.corpus_index.resolve_corpus_inputs`.
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    try:
        files = resolve_corpus_inputs([str(e) for e in entries], unindexed=True)
    except InputError as err:
        msg = f"data.corpus entry {err}"
        raise InputError(msg) from err
    return list(dict.fromkeys(p.resolve() for p in files))


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
        parquet = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering would hold the whole file in memory
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


@contextlib.contextmanager
def _writing(cache_root: Path) -> Iterator[None]:
    """Turn an ``OSError`` of the enclosed writes into a :class:`CacheWriteError` naming the cache and the fix."""
    try:
        yield
    except OSError as err:
        problem, out_of_space = describe_write_error(err, cache_root)
        fix = (
            "Free space (or raise the quota or limit), or set data.cache_dir to a directory on a disk with room for it"
            if out_of_space
            else "Fix the cause, or set data.cache_dir to another directory"
        )
        msg = f"cannot write the token cache in {cache_root} (data.cache_dir): {problem}. {fix}, then rerun"
        raise CacheWriteError(msg) from err


def _allocate(path: Path) -> None:
    """Reserve the disk blocks of a sparse file (a fresh memmap), so that a full disk fails here with ENOSPC.

    Without it, the kernel finds the disk full only when it writes the memmap's pages back, and kills the
    process with SIGBUS instead of raising an error.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS: no such call
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _write_split(files: list[Path], split: str, role: str, out_dir: Path) -> dict[str, int]:
    """Write ``<role>.tokens.npy`` and ``<role>.offsets.npy`` for the rows whose ``split`` is ``split``."""
    keep_all = role == "train"
    n_cells, n_tokens = _count_split(files, split, keep_all)
    tokens_path = out_dir / f"{role}.tokens.npy"
    with _writing(out_dir.parent):
        tokens = np.lib.format.open_memmap(tokens_path, mode="w+", dtype=np.int32, shape=(n_tokens,))
        _allocate(tokens_path)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)  # 8 bytes per cell: small enough to keep in memory
    max_id = _fill_split(files, split, keep_all, tokens, offsets)  # reads parquet: its errors are not write errors
    with _writing(out_dir.parent):
        tokens.flush()
        np.save(out_dir / f"{role}.offsets.npy", offsets)
    content = content_sha256(tokens, offsets)
    return {"cells": n_cells, "tokens": n_tokens, "max_token_id": max_id, "content_sha256": content}


def content_sha256(tokens: np.ndarray, offsets: np.ndarray, *, block: int = 1 << 24) -> str:
    """SHA-256 of a split's cells: the int64 offsets, then the int32 tokens (little-endian), in corpus order.

    Identifies the training data by what it is, not by file names or times: checkpoints record it, and a resume
    on other cells (the same files with changed counts, another vocabulary or gene medians) is refused.
    """
    hasher = hashlib.sha256(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    for start in range(0, tokens.shape[0], block):  # blocks: a corpus never needs to fit in memory twice
        hasher.update(np.ascontiguousarray(tokens[start : start + block], dtype="<i4").data)
    return hasher.hexdigest()


def remove_stale_builds(cache_root: Path) -> list[Path]:
    """Delete the temporary directories of cache builds on this host whose process is gone; returns them.

    Another host's directories are never touched (its processes cannot be checked from here), nor those of a
    live process (a build in progress).
    """
    host = socket.gethostname()
    removed = []
    for path in sorted(cache_root.glob(".tmp-*")):
        match = _TMP_DIR.match(path.name)
        if match is None or match["host"] != host or not path.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.warning("removed %d temporary cache directories of killed builds: %s", len(removed), removed)
    return removed


def build_cache(files: list[Path], cache_root: Path, splits: dict[str, str]) -> Path:
    """Convert the corpus into ``cache_root/<fingerprint>/`` unless it is already there.

    Args:
        files: Parquet files in corpus order.
        cache_root: ``data.cache_dir``.
        splits: Role → value of the ``split`` column, e.g. ``{"train": "train", "validation": "validation"}``.
            Rows of a file without a ``split`` column all count as train.

    Returns:
        The complete cache directory.

    Raises:
        CacheWriteError: when the cache cannot be written; its temporary directory is removed.
    """
    final = cache_root / corpus_fingerprint(files, splits)
    if (final / "manifest.json").is_file():
        return final
    tmp = cache_root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
    with _writing(cache_root):
        cache_root.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(cache_root)  # also this process's own leftover, if any
        tmp.mkdir()
    try:
        manifest = {"files": [str(p) for p in files], "splits": splits}
        for role, value in splits.items():
            manifest[role] = _write_split(files, value, role, tmp)
        with _writing(cache_root):
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            fsync_tree(tmp)  # the data reaches the disk before the directory gets its final name
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "manifest.json").is_file():
                    raise
                # another node or rank finished the same cache first; its copy is identical
            fsync_dir(cache_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else incomplete
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
    return TokenStore(tokens=tokens, offsets=offsets, content_sha256=manifest[role]["content_sha256"])
