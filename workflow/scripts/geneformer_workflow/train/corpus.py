"""``data.corpus`` for command-line runs: parquet files → a training store under ``data.cache_dir``.

The workflow builds the training store with its own CPU jobs and passes ``data.store``
(:mod:`geneformer_workflow.tokenize.store`). A run given ``data.corpus`` instead (parquet files, ``dataset.json``
indexes, directories, globs) builds the same kind of store itself, one part per file, under
``data.cache_dir/<fingerprint>/``, before its first step. The fingerprint covers each file's absolute path,
size and modification time, the split values and the vocabulary size, so a changed corpus gets a new store;
older stores are never removed (delete them yourself, or build one with ``gfw store build`` and pass
``data.store``). The store is written into a temporary directory ``.tmp-<fingerprint>-<host>-<pid>``, fsynced
and renamed, so a killed job never leaves a half-written store that looks complete; the temporary directories
of builds on this host whose process is gone are removed before the next build. A build that cannot write
(disk full, quota) raises :class:`CacheWriteError` naming the directory and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from ..atomic import fsync_dir, fsync_tree, pid_alive
from ..tokenize.corpus_index import resolve_corpus_inputs
from ..tokenize.h5ad import InputError
from ..tokenize.store import INDEX_NAME, STORE_FORMAT, SplitValues, build_store, content_sha256
from .checkpoint import describe_write_error

__all__ = ["CacheWriteError", "build_cache", "content_sha256", "corpus_fingerprint", "resolve_corpus_files"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the cache layout changes (2: content checksums, 3: a training store)
_TMP_DIR = re.compile(r"^\.tmp-(?P<fingerprint>[0-9a-f]{16})-(?P<host>.+)-(?P<pid>\d+)$")


class CacheWriteError(OSError):
    """The token cache could not be written; the message names the directory, the problem and the fix."""


def resolve_corpus_files(spec: str | list[str] | tuple[str, ...]) -> list[Path]:
    """Expand ``data.corpus`` into absolute parquet paths in the given order.

    Entries may be parquet files, ``dataset.json`` indexes (``gfw index``) or directories holding one (exactly
    the shards listed), other directories or globs (their ``*.parquet`` files, sorted); see
    :func:`~geneformer_workflow.tokenize.corpus_index.resolve_corpus_inputs`.
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    try:
        files = resolve_corpus_inputs([str(e) for e in entries], unindexed=True)
    except InputError as err:
        msg = f"data.corpus entry {err}"
        raise InputError(msg) from err
    return list(dict.fromkeys(p.resolve() for p in files))


def corpus_fingerprint(files: list[Path], split_values: dict[str, str], vocab_size: int | None = None) -> str:
    """A short hash of the files' paths, sizes and mtimes plus the split names and the vocabulary size."""
    key = f"format={CACHE_FORMAT};store={STORE_FORMAT};splits={sorted(split_values.items())};vocab={vocab_size}"
    hasher = hashlib.sha256(key.encode())
    for path in files:
        stat = path.stat()
        hasher.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:16]


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


def build_cache(
    files: list[Path],
    cache_root: Path,
    splits: dict[str, str],
    *,
    vocab_size: int | None = None,
    token_dictionary_sha256: str | None = None,
) -> Path:
    """Build a training store of the corpus in ``cache_root/<fingerprint>/`` unless it is already there.

    Args:
        files: Parquet files in corpus order (one store part each).
        cache_root: ``data.cache_dir``.
        splits: Role → value of the ``split`` column, e.g. ``{"train": "train", "validation": "validation"}``.
            Rows of a file without a ``split`` column all count as train.
        vocab_size: Ids in the vocabulary (uint16 tokens up to 65,536); None stores int32.
        token_dictionary_sha256: The vocabulary's checksum, recorded in the store.

    Returns:
        The complete store directory (open it with :func:`geneformer_workflow.tokenize.store.open_store`).

    Raises:
        CacheWriteError: when the store cannot be written; its temporary directory is removed.
    """
    final = cache_root / corpus_fingerprint(files, splits, vocab_size)
    if (final / INDEX_NAME).is_file():
        return final
    tmp = cache_root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
    with _writing(cache_root):
        cache_root.mkdir(parents=True, exist_ok=True)
        remove_stale_builds(cache_root)  # also this process's own leftover, if any
        tmp.mkdir()
    try:
        with _writing(cache_root):
            build_store(
                files,
                tmp,
                vocab_size=vocab_size if vocab_size is not None else 1 << 31,
                splits=SplitValues(**splits),
                token_dictionary_sha256=token_dictionary_sha256,
            )
            fsync_tree(tmp)  # the data reaches the disk before the directory gets its final name
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / INDEX_NAME).is_file():
                    raise
                # another node or rank finished the same store first; its copy is identical
            fsync_dir(cache_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else incomplete
    return final
