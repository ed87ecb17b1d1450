"""The input files of the workflow's DAG: which files, the config paths checked, and each file's row-range shards.

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

import glob
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from geneformer_workflow.presets import CORPUS_COLUMNS

__all__ = [
    "CACHE_VERSION",
    "cached_cell_counts",
    "check_config_paths",
    "find_inputs",
    "plan_row_ranges",
    "plan_shards",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def find_inputs(patterns: Sequence[str]) -> dict[str, str]:
    """Input ``.h5ad`` files by dataset name (file stem), from paths and glob patterns (config ``inputs``).

    Raises:
        ValueError: a pattern matching nothing, a missing file, or two files with one dataset name.
    """
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            msg = f"config 'inputs': the pattern {pattern!r} matches no file"
            raise ValueError(msg)
        files.extend(matches)
    datasets: dict[str, str] = {}
    for path in files:
        name = Path(path).name.removesuffix(".h5ad")
        if name in datasets and datasets[name] != path:
            msg = f"config 'inputs': two files share the dataset name {name!r}: {datasets[name]}, {path}"
            raise ValueError(msg)
        if not Path(path).is_file():
            msg = f"config 'inputs': {path} does not exist"
            raise ValueError(msg)
        datasets[name] = path
    return datasets


def check_config_paths(config: Mapping[str, Any]) -> None:
    """Every file the config names must exist before any job runs (a misspelt path is never skipped silently);
    obs columns to keep must not collide with the corpus's own columns."""
    paths = {
        "vocabulary.token_dictionary": config["vocabulary"].get("token_dictionary"),
        "vocabulary.gene_medians": config["vocabulary"].get("gene_medians"),
    }
    if config.get("gene_mapping") and config["gene_mapping"] != "GRCh38":
        paths["gene_mapping"] = config["gene_mapping"]
    for key, path in paths.items():
        if path and not Path(path).exists():
            msg = f"config '{key}': {path} does not exist (relative paths start at {Path.cwd()})"
            raise ValueError(msg)
    columns = list(config["tokenize"]["obs_columns"])
    clashes = sorted(set(columns) & set(CORPUS_COLUMNS))
    if clashes:
        msg = (
            f"config 'tokenize.obs_columns': {clashes} are the corpus's own column names "
            f"{list(CORPUS_COLUMNS)}; rename those obs columns in the input files or leave them out"
        )
        raise ValueError(msg)
    if len(set(columns)) != len(columns):
        msg = f"config 'tokenize.obs_columns': {columns} lists a column twice"
        raise ValueError(msg)


def plan_shards(
    datasets: Mapping[str, str], counts: str, shard_cells: int, cache: str | Path | None
) -> dict[str, list[tuple[int, int | None]]]:
    """Row ranges ``(start, stop)`` per dataset: large files are tokenized as parallel shards.

    Without h5py where Snakemake runs (e.g. ``--use-conda`` with a bare Snakemake), every file is one shard
    ``(0, None)``.
    """
    try:
        import h5py  # noqa: F401 (the header reads need it)
    except ImportError:
        return {name: [(0, None)] for name in datasets}
    cells = cached_cell_counts(datasets, counts, cache)
    return {name: list(plan_row_ranges(n, shard_cells)) for name, n in cells.items()}


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
            from geneformer_workflow.tokenize.h5ad import header_cell_count  # h5py, numpy: only on a miss

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
