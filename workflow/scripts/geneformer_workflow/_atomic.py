"""Atomic file output: write under a temporary name, rename into place only on success.

A killed or failed step therefore never leaves a file that looks complete (DESIGN §7, issue 7). The data is
fsynced before the rename and the directory after it, so a crash of the machine (power loss, kernel panic) cannot
leave a renamed but empty or short file either: without the first fsync the rename may reach the disk before the
data does (ext4 and XFS with delayed allocation).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

# fsync of a directory is not supported everywhere: Windows cannot open one, some file systems refuse it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTSUP}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    Works for files and directories. On error the temporary path is removed and ``path`` is untouched;
    temporaries of an earlier killed run for the same ``path`` are removed first (one writer per output,
    as Snakemake guarantees).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob_escape(target.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run writing the same output
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        fsync_tree(tmp_target)  # the data is on disk before the name is: a crash leaves the old file or the new
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp_target, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """``fsync`` a file, or every file and directory under a directory; a failure (e.g. ENOSPC) raises."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        for child in sorted(path.iterdir()):
            fsync_tree(child)
        fsync_dir(path)
    elif path.is_file():  # not a FIFO or socket: opening those could block
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory, making the renames and new entries in it durable, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
