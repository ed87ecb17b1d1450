"""Which shards make a dataset's corpus, and whether a shard is complete.

A tokenized dataset is one or more shards (``shard-NNNN.parquet`` + lengths + manifest, written together by
``gfw tokenize``) and an index, ``dataset.json``, written by ``gfw index`` (the workflow's ``index_dataset``
rule) beside them::

    results/tokenized/{dataset}/dataset.json           shards in order, cell/token counts, vocabulary checksum
    results/tokenized/{dataset}/dataset.lengths.npy    every cell's length, in shard order (safe format)
    results/tokenized/{dataset}/dataset.lengths.pkl    the same as Geneformer's ``example_lengths_file``

Consumers (training, ``gfw embed``, ``gfw hf-dataset``) read exactly the shards an index lists, never a glob of
the directory: a shard left from an earlier run with another ``tokenize.shard_cells`` is not part of the corpus.
"""

from __future__ import annotations

import glob
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_workflow.atomic import atomic_files
from geneformer_workflow.tokenize.genes import read_json_object
from geneformer_workflow.tokenize.h5ad import InputError

log = logging.getLogger(__name__)

INDEX_NAME = "dataset.json"
INDEX_FORMAT = 1
WRITE_ID_KEY = b"geneformer_workflow.write_id"  # parquet key-value metadata; the manifest holds the same id
# manifest fields that must agree between the shards of one corpus
_SHARED_FIELDS = ("preset", "max_length", "special_tokens", "vocab_size", "token_dictionary_sha256")


@dataclass
class CorpusPaths:
    """The files written for one tokenized input (one shard): the parquet corpus and its side files."""

    parquet: Path
    lengths_npy: Path
    lengths_pkl: Path
    manifest: Path

    @classmethod
    def beside(cls, parquet: str | Path) -> CorpusPaths:
        """``X.parquet`` → ``X.lengths.npy``, ``X.lengths.pkl``, ``X.manifest.json``.

        Only a ``.parquet`` suffix is replaced: ``donor.1`` gets ``donor.1.lengths.npy``, so outputs that differ
        only after their last dot never share side files.
        """
        parquet = Path(parquet)
        stem = parquet.with_suffix("") if parquet.suffix == ".parquet" else parquet
        return cls(parquet, Path(f"{stem}.lengths.npy"), Path(f"{stem}.lengths.pkl"), Path(f"{stem}.manifest.json"))

    def all(self) -> list[Path]:
        """The files in commit order: the manifest, which readers require, last."""
        return [self.parquet, self.lengths_npy, self.lengths_pkl, self.manifest]


def manifest_path(parquet: str | Path) -> Path:
    """The manifest written beside a shard by ``gfw tokenize`` (``X.parquet`` → ``X.manifest.json``)."""
    return CorpusPaths.beside(parquet).manifest


def _parquet_write_id(parquet: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(parquet).metadata or {}
    except (OSError, ValueError) as err:
        msg = f"{parquet}: not a readable parquet file ({err})"
        raise InputError(msg) from err
    value = metadata.get(WRITE_ID_KEY)
    return value.decode() if value is not None else None


def verify_shard(parquet: str | Path) -> dict[str, Any] | None:
    """The manifest of a corpus shard, after checking that it describes this very file.

    Returns None for a parquet file that ``gfw tokenize`` did not write (no write id in its metadata: a
    user's own corpus, or one from an earlier version), which is accepted as it is.

    Raises:
        InputError: the shard was cut short (no manifest: a killed or failed ``gfw tokenize``), or its manifest
            belongs to another write of the same path.
    """
    parquet = Path(parquet)
    write_id = _parquet_write_id(parquet)
    if write_id is None:
        return None
    manifest_file = manifest_path(parquet)
    if not manifest_file.is_file():
        msg = (
            f"{parquet}: incomplete corpus shard: its manifest {manifest_file.name} is missing (a tokenize run was "
            "killed or failed while writing it); rerun the tokenize step (Snakemake: --rerun-incomplete)"
        )
        raise InputError(msg)
    manifest = read_json_input(manifest_file, "shard manifest")
    if manifest.get("write_id") != write_id:
        msg = (
            f"{parquet}: its manifest {manifest_file.name} describes another write of this file (write ids "
            f"{manifest.get('write_id')} != {write_id}); rerun the tokenize step for it"
        )
        raise InputError(msg)
    return manifest


def read_json_input(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file, with errors that name the file (``InputError``)."""
    try:
        return read_json_object(path, what, "{...}")
    except OSError as err:
        msg = f"{path}: cannot read the {what} ({err})"
        raise InputError(msg) from err
    except ValueError as err:
        raise InputError(str(err)) from err


@dataclass(frozen=True)
class DatasetIndex:
    """A dataset's corpus: its shards in order and what their manifests say."""

    path: Path
    shards: tuple[Path, ...]
    info: dict[str, Any]

    @property
    def lengths_npy(self) -> Path:
        """Every cell's length in shard order (``np.load``)."""
        return self.path.parent / self.info["lengths"][0]

    @property
    def lengths_pkl(self) -> Path:
        """The same lengths as Geneformer's ``example_lengths_file`` (a pickled list of ints)."""
        return self.path.parent / self.info["lengths"][1]


def index_paths(index: str | Path) -> list[Path]:
    """``dataset.json`` → ``[dataset.lengths.npy, dataset.lengths.pkl, dataset.json]`` (commit order)."""
    index = Path(index)
    stem = index.with_suffix("") if index.suffix == ".json" else index
    return [Path(f"{stem}.lengths.npy"), Path(f"{stem}.lengths.pkl"), index]


def write_dataset_index(shards: list[Path], index: str | Path, *, overwrite: bool = True) -> DatasetIndex:
    """Check the shards of one dataset belong together and write its index and lengths files, atomically.

    Shards are stored by name relative to the index's directory when they are inside it, so the
    directory can be moved or copied.

    Raises:
        InputError: a shard is incomplete, or the shards were tokenized with different vocabularies or presets.
    """
    index = Path(index)
    if not shards:
        msg = f"{index}: a dataset index needs at least one shard"
        raise InputError(msg)
    manifests = []
    for shard in shards:
        manifest = verify_shard(shard)
        if manifest is None:
            msg = (
                f"{shard}: has no write id (written by an older gfw or another tool); only shards of this "
                "version's `gfw tokenize` can be indexed: rerun its tokenize step (Snakemake: --forcerun "
                "tokenize_dataset)"
            )
            raise InputError(msg)
        manifests.append(manifest)
    for field in _SHARED_FIELDS:
        values = {json.dumps(m.get(field)) for m in manifests}
        if len(values) > 1:
            msg = f"{index}: its shards disagree on {field} ({sorted(values)}); tokenize them with one vocabulary"
            raise InputError(msg)
    lengths = np.concatenate([np.load(CorpusPaths.beside(s).lengths_npy, allow_pickle=False) for s in shards])
    lengths = lengths.astype(np.int32)
    expected = sum(int(m["n_cells"]) for m in manifests)
    if lengths.size != expected:
        msg = f"{index}: the shards' lengths files hold {lengths.size} cells but their manifests {expected}"
        raise InputError(msg)
    npy, pkl, _ = index_paths(index)
    info = {
        "format": INDEX_FORMAT,
        "shards": [_relative(s, index.parent) for s in shards],
        "lengths": [npy.name, pkl.name],
        **{field: manifests[0].get(field) for field in _SHARED_FIELDS},
        "n_cells": expected,
        "n_validation": sum(int(m.get("n_validation", 0)) for m in manifests),
        "n_tokens": sum(int(m["n_tokens"]) for m in manifests),
        "write_ids": [m["write_id"] for m in manifests],
    }
    with atomic_files(index_paths(index), inputs=shards, overwrite=overwrite) as (tmp_npy, tmp_pkl, tmp_index):
        with open(tmp_npy, "wb") as fh:
            np.save(fh, lengths)
        with open(tmp_pkl, "wb") as fh:
            pickle.dump([int(x) for x in lengths], fh, protocol=4)  # Geneformer's example_lengths_file
        tmp_index.write_text(json.dumps(info, indent=2) + "\n")
    _warn_stale_shards(index, shards)
    return DatasetIndex(index, tuple(Path(s) for s in shards), info)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _warn_stale_shards(index: Path, shards: list[Path]) -> None:
    """Name parquet files beside the index that are not part of it (left by an earlier run); never delete them."""
    listed = {s.resolve() for s in shards}
    stale = sorted(p.name for p in index.parent.glob("*.parquet") if p.resolve() not in listed)
    if stale:
        log.warning(
            "%s: %d parquet file(s) in %s are not part of this dataset and are not used: %s (left by an earlier "
            "run, e.g. with another tokenize.shard_cells; delete them if you do not need them)",
            index.name,
            len(stale),
            index.parent,
            ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""),
        )


def read_dataset_index(path: str | Path) -> DatasetIndex:
    """Read ``dataset.json`` (or a directory holding one) and check that each listed shard is complete.

    Raises:
        InputError: the index is unreadable, a shard is missing or incomplete, or it was rewritten since.
    """
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    info = read_json_input(path, "dataset index")
    if info.get("format") != INDEX_FORMAT or not isinstance(info.get("shards"), list):
        msg = f"{path}: not a dataset index of format {INDEX_FORMAT} (written by `gfw index`)"
        raise InputError(msg)
    shards = tuple(path.parent / s for s in info["shards"])
    for shard, write_id in zip(shards, info.get("write_ids") or [None] * len(shards), strict=False):
        if not shard.is_file():
            msg = f"{path}: lists the shard {shard}, which does not exist; rerun the tokenize steps"
            raise InputError(msg)
        manifest = verify_shard(shard)
        if write_id is not None and (manifest or {}).get("write_id") != write_id:
            msg = f"{path}: the shard {shard.name} was rewritten after the index was made; rerun `gfw index`"
            raise InputError(msg)
    return DatasetIndex(path, shards, info)


def resolve_corpus_inputs(entries: list[str | Path], *, unindexed: bool = False) -> list[Path]:
    """The parquet files of a corpus given as parquet files, ``dataset.json`` indexes or directories holding one.

    A ``.txt`` file lists more entries, one per line, relative to its own directory (the workflow writes
    ``results/tokenized/datasets.txt``: the indexes of exactly the datasets of its ``inputs``, unlike a glob, which
    also matches datasets removed from them). An index (or a directory holding one) gives exactly the shards it
    lists, each checked complete
    (:func:`verify_shard`); so is every parquet file given by name. With ``unindexed`` (training's
    ``data.corpus``, which also takes users' own parquet folders), a directory without an index reads all its
    ``*.parquet`` files (with a warning: stale shards would be read too) and a glob pattern its matches, both in
    sorted order; otherwise such a directory is refused. A file listed twice is kept once.

    Raises:
        InputError: naming the entry that matches nothing usable, or an incomplete shard.
    """
    files: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_file() and entry.suffix == ".txt":
            files.extend(resolve_corpus_inputs(read_corpus_list(entry), unindexed=unindexed))
            continue
        if (entry.is_dir() and (entry / INDEX_NAME).is_file()) or (entry.is_file() and entry.suffix == ".json"):
            files.extend(read_dataset_index(entry).shards)
            continue
        if entry.is_file():
            found = [entry]
        elif entry.is_dir() and not unindexed:
            msg = (
                f"{entry}: a directory without {INDEX_NAME}; pass its shard files, or write the index with "
                f"`gfw index {entry}/shard-*.parquet -o {entry}/{INDEX_NAME}`"
            )
            raise InputError(msg)
        elif entry.is_dir():
            found = sorted(entry.glob("*.parquet"))
            if found:
                log.warning("%s has no %s; reading all %d parquet files in it", entry, INDEX_NAME, len(found))
        elif unindexed:
            found = sorted(Path(p) for p in glob.glob(str(entry), recursive=True) if Path(p).is_file())
        else:
            found = []
        if not found:
            kinds = "parquet files, dataset.json indexes, directories or globs" if unindexed else "files or indexes"
            msg = f"{entry}: no such corpus file, dataset index or directory (give {kinds})"
            raise InputError(msg)
        for file in found:
            verify_shard(file)
        files.extend(found)
    return list(dict.fromkeys(files))


def read_corpus_list(path: Path) -> list[Path]:
    """The entries a ``.txt`` corpus list names, one per line (blank lines skipped), relative to its directory.

    Raises:
        InputError: an empty list, or a list that names a list (which could name the first one again).
    """
    entries = [path.parent / line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        msg = f"{path}: the corpus list names no dataset index or corpus file (one path per line)"
        raise InputError(msg)
    nested = [entry for entry in entries if entry.suffix == ".txt"]
    if nested:
        msg = f"{path}: a corpus list may not name another list ({nested[0]}); name dataset indexes or shards"
        raise InputError(msg)
    return entries
