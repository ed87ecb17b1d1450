"""Planning facts about the input files for the workflow's DAG, cached so that planning does not open every file.

Snakemake parses the workflow once per `snakemake` call, and again inside every cluster job. The DAG needs one
fact from each input, its number of cells (to split large files into row-range shards). Reading it from the
file header costs a few milliseconds a file (2,000 inputs: 11 s of `snakemake -n`, docs/scale.md); the cache
keeps it per file, keyed by the file's state (size, modification time in ns, inode) and the count
source, so a changed, replaced or touched file is read again (only an in-place rewrite to the very same
size within the filesystem's timestamp resolution would go unnoticed).

The cache is a small JSON file that only this module writes (atomically: a reader sees the old or the new
file, also with several Snakemake processes planning at once). When it cannot be read or written, planning
reads the headers, as it would without it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from geneformer_workflow._io import InputError, _locate, _open_h5ad, _shape_attribute, count_cells

__all__ = ["CACHE_VERSION", "cached_cell_counts", "header_cell_count", "plan_row_ranges"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def header_cell_count(path: str | Path, counts: str = "X") -> int:
    """Cells of an ``.h5ad`` file from its count matrix's header (about 1 ms; no value is read).

    Anything unexpected (not HDF5, no such matrix, an odd shape) defers to :func:`count_cells`, which checks the
    matrix's layout and raises the :class:`InputError` every ``gfw`` command gives for that file.
    """
    path = Path(path)
    try:
        with _open_h5ad(path) as f:
            node, _ = _locate(f, counts, InputError)
            shape = node.shape if hasattr(node, "ndim") else _shape_attribute(node)
            if shape is not None and len(shape) == 2:
                return int(shape[0])
    except (InputError, OSError, KeyError, TypeError, ValueError):
        pass
    return count_cells(path, counts)


def _state(path: str | Path, counts: str) -> list[object]:
    """What must be unchanged for a cached count to hold: size, mtime (ns), inode, count source.

    Not the device number: on a network filesystem each client numbers the mount itself, so the login node
    and the compute nodes would invalidate each other's entries.
    """
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, counts]


def _load(cache: Path) -> dict[str, list[object]]:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save(cache: Path, files: dict[str, list[object]]) -> None:
    """Replace the cache atomically (a temporary file beside it, then ``os.replace``); failures only log."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": CACHE_VERSION, "files": files}, fh, separators=(",", ":"))
            os.replace(tmp, cache)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        log.debug("could not write the planning cache %s: %s", cache, err)


def cached_cell_counts(paths: Mapping[str, str | Path], counts: str, cache: str | Path | None) -> dict[str, int]:
    """Cells of every input file (by dataset name), from ``cache`` where the file is unchanged since it was read.

    Args:
        paths: dataset name -> ``.h5ad`` path.
        counts: the count source (``X``, ``raw`` or ``layers/<name>``).
        cache: the cache file (``None``: read every header). It keeps the entries of ``paths`` only, so it
            stays as small as the input list (about 100 bytes a file).

    Raises:
        InputError: a file that is not a readable ``.h5ad`` with that count matrix.
    """
    cache = Path(cache) if cache is not None else None
    cached = _load(cache) if cache is not None else {}
    result, files = {}, {}
    for name, path in paths.items():
        key = os.path.abspath(path)
        state = _state(path, counts)
        entry = cached.get(key)
        if isinstance(entry, list) and entry[:-1] == state and isinstance(entry[-1], int):
            result[name] = entry[-1]
        else:
            result[name] = header_cell_count(path, counts)
        files[key] = [*state, result[name]]
    if cache is not None and files != cached:
        _save(cache, files)
    return result


def plan_row_ranges(n_cells: int, shard_cells: int) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` of at most ``shard_cells`` cells covering ``n_cells`` (one empty range for 0).

    Example:
        >>> plan_row_ranges(5, 2)
        [(0, 2), (2, 4), (4, 5)]
    """
    if shard_cells < 1:
        msg = f"shard_cells must be at least 1, got {shard_cells}"
        raise ValueError(msg)
    return [(lo, min(lo + shard_cells, n_cells)) for lo in range(0, max(n_cells, 1), shard_cells)]
