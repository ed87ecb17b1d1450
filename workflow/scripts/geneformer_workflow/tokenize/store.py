"""The training store: a tokenized corpus in the layout the trainer reads, built once by CPU jobs.

Parquet is compressed, so reading single cells at random would decode whole row groups. The store holds
the same cells uncompressed, for memory mapping: one *part* per corpus shard, and an index over all parts::

    STORE/store.json                        the index: the parts in corpus order, cells, tokens and checksums
    STORE/<part>.tokens.npy                 the part's token ids: its train cells, then its validation cells
    STORE/<part>.offsets.npy                int64 cell boundaries (cells + 1): cell i = tokens[offsets[i]:offsets[i+1]]
    STORE/<part>.json                       the part's manifest (written last: a part without it is incomplete)

Tokens are ``uint16`` when the vocabulary has at most 65,536 ids (Geneformer's have about 20,000 and 25,000),
else ``int32``: about 2 bytes per token plus 8 bytes per cell. Each part is written in one pass over its shard's
``input_ids`` (the cheap ``length``/``split`` columns are read first to size the file), with the train and
validation cells going to their two regions of the token file, so the validation split costs no second decode.
Rows whose ``split`` is neither value belong to no split; a shard without a ``split`` column is all train.

Every path in the index is relative to the index's directory and nothing records a time or a host, so a
store can be moved or copied with its directory. The workflow writes each shard's part in the shard's
``tokenize_dataset`` job and the index in a ``store_index`` job (``workflow/rules/store.smk``); ``gfw store build``
builds one from any corpus.
The trainer only opens it (:func:`open_store`), checking that every part is there with its recorded size.

Identity: each split of each part has a SHA-256 of its cells (:func:`content_sha256`: int64 offsets from 0,
then the tokens as little-endian int32, in corpus order); a split's checksum is the SHA-256 of its parts'
checksums in order. It depends on the cells, their order and the part boundaries, never on paths or times.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_workflow.atomic import atomic_files
from geneformer_workflow.tokenize.corpus_index import read_json_input
from geneformer_workflow.tokenize.h5ad import InputError

STORE_FORMAT = 1
INDEX_NAME = "store.json"
ROLES = ("train", "validation")
UINT16_IDS = 1 << 16  # vocabularies up to this many ids store tokens as uint16
REQUIRED_COLUMNS = ("input_ids", "length")
_BATCH_ROWS = 4096
_HASH_BLOCK = 1 << 24


@dataclass(frozen=True)
class SplitValues:
    """Values of the corpus ``split`` column that make the train and validation splits."""

    train: str = "train"
    validation: str = "validation"

    def as_dict(self) -> dict[str, str]:
        """``{"train": ..., "validation": ...}``."""
        return {"train": self.train, "validation": self.validation}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token type for ids ``0 .. vocab_size - 1``: uint16 up to 65,536 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_IDS else np.dtype(np.int32)


def part_paths(manifest: str | Path) -> list[Path]:
    """``X.json`` → ``[X.tokens.npy, X.offsets.npy, X.json]``: a part's files in commit order (manifest last)."""
    manifest = Path(manifest)
    stem = manifest.with_suffix("") if manifest.suffix == ".json" else manifest
    return [Path(f"{stem}.tokens.npy"), Path(f"{stem}.offsets.npy"), Path(f"{stem}.json")]


def content_sha256(tokens: np.ndarray, offsets: np.ndarray, *, block: int = _HASH_BLOCK) -> str:
    """SHA-256 of cells: the int64 offsets, then the tokens as little-endian int32, in order.

    Identifies training data by what it is, not by file names, times or the stored token type.
    """
    hasher = hashlib.sha256(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    for start in range(0, tokens.shape[0], block):  # blocks: a split never needs to fit in memory twice
        hasher.update(np.ascontiguousarray(tokens[start : start + block], dtype="<i4").data)
    return hasher.hexdigest()


def combined_sha256(digests: list[str]) -> str:
    """A split's checksum from its parts' checksums, in order."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- writing a part
def _read_roles(parquet: Any, path: Path, splits: SplitValues) -> tuple[np.ndarray, np.ndarray]:
    """``(role per row: 0 train, 1 validation, -1 none; length per row)`` from the cheap columns."""
    names = parquet.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        msg = f"{path}: lacks column(s) {missing}; is it a corpus shard written by `gfw tokenize`?"
        raise InputError(msg)
    columns = ["length", "split"] if "split" in names else ["length"]
    table = parquet.read(columns=columns)
    lengths = table.column("length").to_numpy(zero_copy_only=False).astype(np.int64)
    if "split" not in names:
        return np.zeros(lengths.shape[0], dtype=np.int8), lengths
    import pyarrow.compute as pc

    split = table.column("split")
    roles = np.full(lengths.shape[0], -1, dtype=np.int8)
    for role, value in enumerate((splits.train, splits.validation)):
        roles[np.asarray(pc.fill_null(pc.equal(split, value), False), dtype=bool)] = role
    return roles, lengths


@dataclass
class _SplitWriter:
    """One split's region of a part's token file: a write cursor, a running checksum and statistics."""

    fd: int
    position: int  # byte offset in the token file
    dtype: np.dtype
    hasher: Any
    longest: int = -1
    longest_cell: int = -1
    max_id: int = -1
    cells_written: int = 0
    tokens_written: int = 0

    def write(self, flat: np.ndarray, cell_lengths: np.ndarray) -> None:
        data = np.ascontiguousarray(flat, dtype=self.dtype)
        os.pwrite(self.fd, data.tobytes(), self.position)
        self.position += data.nbytes
        self.hasher.update(np.ascontiguousarray(flat, dtype="<i4").data)
        if flat.shape[0]:
            self.max_id = max(self.max_id, int(flat.max()))
        if cell_lengths.shape[0] and int(cell_lengths.max()) > self.longest:
            self.longest = int(cell_lengths.max())
            self.longest_cell = self.cells_written + int(np.argmax(cell_lengths))
        self.cells_written += cell_lengths.shape[0]
        self.tokens_written += flat.shape[0]


def _check_ids(flat: np.ndarray, path: Path, vocab_size: int) -> None:
    if flat.shape[0] and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        bad = int(flat.min()) if int(flat.min()) < 0 else int(flat.max())
        msg = (
            f"{path}: holds token id {bad}, outside the vocabulary of {vocab_size} ids; give the vocabulary the "
            "corpus was tokenized with (--vocab-dir, data.vocab_dir)"
        )
        raise InputError(msg)


def _write_tokens(
    parquet: Any, path: Path, roles: np.ndarray, lengths: np.ndarray, tmp_tokens: Path, dtype: np.dtype,
    vocab_size: int, offsets_by_role: list[np.ndarray],
) -> list[_SplitWriter]:  # fmt: skip
    """Decode ``input_ids`` once, writing train and validation cells to their regions of the token file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    totals = [int(lengths[roles == r].sum()) for r in (0, 1)]
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (sum(totals),)}
    with open(tmp_tokens, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        start = fh.tell()
        fh.truncate(start + sum(totals) * dtype.itemsize)
    fd = os.open(tmp_tokens, os.O_WRONLY)
    try:
        writers = [
            _SplitWriter(fd, start, dtype, hashlib.sha256(np.ascontiguousarray(offsets_by_role[0], "<i8").tobytes())),
            _SplitWriter(
                fd,
                start + totals[0] * dtype.itemsize,
                dtype,
                hashlib.sha256(np.ascontiguousarray(offsets_by_role[1], "<i8").tobytes()),
            ),
        ]
        row = 0
        columns = ["input_ids", "length"]
        for batch in parquet.iter_batches(columns=columns, batch_size=_BATCH_ROWS):
            ids = batch.column("input_ids")
            list_lengths = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            batch_roles = roles[row : row + batch.num_rows]
            bad = int((list_lengths != lengths[row : row + batch.num_rows]).sum())
            if bad:
                msg = f"{path}: {bad} rows have `length` != len(input_ids); re-run the tokenizer"
                raise InputError(msg)
            for role, writer in enumerate(writers):
                keep = batch_roles == role
                if not keep.any():
                    continue
                cells = ids if keep.all() else ids.filter(pa.array(keep))  # arrow copies only the kept lists
                flat = pc.list_flatten(cells).to_numpy(zero_copy_only=False)
                _check_ids(flat, path, vocab_size)
                writer.write(flat, list_lengths[keep])
            row += batch.num_rows
        if row != roles.shape[0] or [w.tokens_written for w in writers] != totals:
            msg = f"{path}: changed while it was read"
            raise InputError(msg)
        os.fsync(fd)
    finally:
        os.close(fd)
    return writers


def write_part(
    parquet: str | Path,
    manifest: str | Path,
    *,
    vocab_size: int,
    splits: SplitValues = SplitValues(),
    token_dictionary_sha256: str | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Convert one corpus shard into a store part (``X.tokens.npy``, ``X.offsets.npy``, ``X.json``), atomically.

    Args:
        parquet: The shard (columns ``input_ids``, ``length``, optionally ``split``).
        manifest: The part's ``X.json``; the other two files are written beside it.
        vocab_size: Ids in the vocabulary: sets the token type; an id outside it is an error.
        splits: Values of the ``split`` column.
        token_dictionary_sha256: The vocabulary's checksum, recorded for the index to compare.
        overwrite: Replace an existing part.

    Returns:
        The part's manifest.

    Raises:
        InputError: the shard is unreadable, lacks a column, has ids outside the vocabulary or wrong lengths.
    """
    import pyarrow.parquet as pq

    parquet = Path(parquet)
    try:
        source = pq.ParquetFile(parquet, pre_buffer=False)  # pre-buffering would hold the whole file in memory
        roles, lengths = _read_roles(source, parquet, splits)
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        msg = f"{parquet}: not a readable parquet file ({err})"
        raise InputError(msg) from err
    dtype = token_dtype(vocab_size)
    offsets_by_role = [np.concatenate([[0], np.cumsum(lengths[roles == r])]).astype(np.int64) for r in (0, 1)]
    paths = part_paths(manifest)
    with atomic_files(paths, inputs=[parquet], overwrite=overwrite) as (tmp_tokens, tmp_offsets, tmp_manifest):
        writers = _write_tokens(source, parquet, roles, lengths, tmp_tokens, dtype, vocab_size, offsets_by_role)
        offsets = np.concatenate([offsets_by_role[0], offsets_by_role[1][1:] + offsets_by_role[0][-1]])
        with open(tmp_offsets, "wb") as fh:
            np.save(fh, offsets)
        info: dict[str, Any] = {
            "format": STORE_FORMAT,
            "source": parquet.name,
            "token_dtype": dtype.name,
            "vocab_size": int(vocab_size),
            "token_dictionary_sha256": token_dictionary_sha256,
            "splits": splits.as_dict(),
            "files": {"tokens": tmp_tokens.stat().st_size, "offsets": tmp_offsets.stat().st_size},
        }
        for role, writer in zip(ROLES, writers, strict=True):
            info[role] = {
                "cells": writer.cells_written,
                "tokens": writer.tokens_written,
                "sha256": writer.hasher.hexdigest(),
                "max_token_id": writer.max_id,
                "longest": writer.longest,
                "longest_cell": writer.longest_cell,
            }
        tmp_manifest.write_text(json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------------------------------------- the index
_SHARED = ("format", "token_dtype", "vocab_size", "token_dictionary_sha256", "splits")


def read_parts_list(path: str | Path) -> list[Path]:
    """Part manifests listed one per line in a text file (blank lines ignored), relative to the current directory."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        msg = f"{path}: cannot read the list of store parts ({err})"
        raise InputError(msg) from err
    parts = [Path(line.strip()) for line in lines if line.strip()]
    if not parts:
        msg = f"{path}: lists no store part"
        raise InputError(msg)
    return parts


def write_index(parts: list[Path], index: str | Path, *, overwrite: bool = True) -> dict[str, Any]:
    """Check the parts belong together and write the store's index over them, in the given order.

    Raises:
        InputError: a part is missing or incomplete, or the parts disagree on the vocabulary, type or splits.
    """
    index = Path(index)
    if not parts:
        msg = f"{index}: a store needs at least one part"
        raise InputError(msg)
    entries, manifests = [], []
    for part in parts:
        tokens, offsets, manifest_file = part_paths(part)
        manifest = read_json_input(manifest_file, "store part manifest (rerun its tokenize_dataset job)")
        for name, file in (("tokens", tokens), ("offsets", offsets)):
            if not file.is_file() or file.stat().st_size != manifest.get("files", {}).get(name):
                msg = f"{file}: missing or not the size its manifest {manifest_file.name} records; rebuild the part"
                raise InputError(msg)
        for key in _SHARED:
            if manifest.get(key) != (manifests[0] if manifests else manifest).get(key):
                msg = (
                    f"{index}: the parts disagree on {key} ({manifests[0].get(key)!r} in {parts[0]}, "
                    f"{manifest.get(key)!r} in {part}); build every part with one vocabulary and split values"
                )
                raise InputError(msg)
        manifests.append(manifest)
        stem = manifest_file.resolve().with_suffix("")
        entry: dict[str, Any] = {"path": os.path.relpath(stem, index.parent.resolve()), "files": manifest["files"]}
        for role in ROLES:
            entry[f"{role}_cells"] = manifest[role]["cells"]
            entry[f"{role}_tokens"] = manifest[role]["tokens"]
        entries.append(entry)
    info: dict[str, Any] = {key: manifests[0][key] for key in _SHARED}
    info["n_parts"] = len(entries)
    for role in ROLES:
        stats = [m[role] for m in manifests]
        longest = max(range(len(stats)), key=lambda k: stats[k]["longest"])
        info[role] = {
            "cells": sum(s["cells"] for s in stats),
            "tokens": sum(s["tokens"] for s in stats),
            "sha256": combined_sha256([s["sha256"] for s in stats]),
            "max_token_id": max(s["max_token_id"] for s in stats),
            "longest": stats[longest]["longest"],
            "longest_cell": sum(s["cells"] for s in stats[:longest]) + stats[longest]["longest_cell"]
            if stats[longest]["cells"]
            else -1,
        }
    info["parts"] = entries
    inputs = [p for part in parts for p in part_paths(part)]
    with atomic_files([index], inputs=inputs, overwrite=overwrite) as (tmp_index,):
        tmp_index.write_text(json.dumps(info, indent=1) + "\n")
    return info


def build_store(
    files: list[Path],
    directory: str | Path,
    *,
    vocab_size: int,
    splits: SplitValues = SplitValues(),
    token_dictionary_sha256: str | None = None,
) -> dict[str, Any]:
    """Write a whole store into ``directory`` (which the caller creates and commits): one part per file, in order."""
    directory = Path(directory)
    parts = [directory / f"part-{k:05d}.json" for k in range(len(files))]
    for file, part in zip(files, parts, strict=True):
        write_part(file, part, vocab_size=vocab_size, splits=splits, token_dictionary_sha256=token_dictionary_sha256)
    return write_index(parts, directory / INDEX_NAME)


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class StoreSplit:
    """One split of a store: its cells across all parts, memory-mapped part by part when first touched."""

    root: Path
    role: str
    part_names: list[str]
    starts: np.ndarray  # (n_parts + 1,) int64: the split's first cell in each part (cumulative)
    skips: np.ndarray  # (n_parts,) int64: cells before the split's own in each part (validation: the train cells)
    content_sha256: str
    longest_cell: int  # index of a longest cell (-1 when the split is empty)
    _open: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _part(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._open:
            stem = self.root / self.part_names[k]
            tokens = np.load(f"{stem}.tokens.npy", mmap_mode="r")
            offsets = np.load(f"{stem}.offsets.npy", mmap_mode="r")
            self._open[k] = (tokens, offsets)
        return self._open[k]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            msg = f"cell {index} outside the {self.role} split of {len(self)} cells"
            raise IndexError(msg)
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return k, index - int(self.starts[k]) + int(self.skips[k])

    def cell(self, index: int) -> np.ndarray:
        """Token ids of cell ``index`` as int32 (a copy)."""
        k, local = self._locate(index)
        tokens, offsets = self._part(k)
        return np.asarray(tokens[int(offsets[local]) : int(offsets[local + 1])], dtype=np.int32)

    def lengths(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) int64 lengths of the given cells, read from the parts' offsets."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty(indices.shape[0], dtype=np.int64)
        if indices.shape[0] == 0:
            return out
        if int(indices.min()) < 0 or int(indices.max()) >= len(self):
            msg = f"cell indices outside the {self.role} split of {len(self)} cells"
            raise IndexError(msg)
        parts = np.searchsorted(self.starts, indices, side="right") - 1
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(len(self.part_names) + 1))
        for k in np.flatnonzero(np.diff(bounds)):
            chosen = order[bounds[k] : bounds[k + 1]]
            local = indices[chosen] - self.starts[k] + self.skips[k]
            _, offsets = self._part(int(k))
            out[chosen] = offsets[local + 1] - offsets[local]
        return out

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        """Lengths of ``indices`` (so a split is a lengths sequence for the sampler)."""
        return self.lengths(indices)

    def argmax(self) -> int:
        """Index of a longest cell (the first one), from the index: no pass over the cells."""
        return self.longest_cell


@dataclass
class TrainingStore:
    """An opened store: its index and both splits."""

    path: Path
    info: dict[str, Any]
    train: StoreSplit
    validation: StoreSplit

    @property
    def content_sha256(self) -> str:
        """The identity of the training data: both splits' checksums."""
        parts = f"train={self.train.content_sha256};validation={self.validation.content_sha256}"
        return hashlib.sha256(parts.encode()).hexdigest()


def _index_file(path: str | Path) -> Path:
    path = Path(path)
    return path / INDEX_NAME if path.is_dir() else path


def open_store(path: str | Path, *, vocab_size: int | None = None, splits: SplitValues | None = None) -> TrainingStore:
    """Open a built store (its ``store.json`` or the directory holding it) for reading.

    Checks, without reading any token: the index is complete and of this format, every part's files exist with
    the sizes it records, the token ids fit ``vocab_size`` and the store was split with ``splits``.

    Raises:
        InputError: naming the file and the problem (a missing or incomplete store says how to build it).
    """
    index = _index_file(path)
    if not index.is_file():
        msg = (
            f"{index}: no training store here; build it with the workflow (rule store_index) or "
            "`gfw store build CORPUS... -o DIR --vocab-dir VOCAB`"
        )
        raise InputError(msg)
    info = read_json_input(index, "training store index")
    if info.get("format") != STORE_FORMAT or not isinstance(info.get("parts"), list):
        msg = f"{index}: not a training store index of format {STORE_FORMAT}; rebuild it with this version"
        raise InputError(msg)
    root = index.parent
    for entry in info["parts"]:
        for name, size in entry["files"].items():
            file = root / f"{entry['path']}.{name}.npy"
            if not file.is_file() or file.stat().st_size != size:
                msg = f"{index}: its part file {file} is missing or not the recorded size; rebuild the store"
                raise InputError(msg)
    if vocab_size is not None:
        max_id = max(info[role]["max_token_id"] for role in ROLES)
        if max_id >= vocab_size:
            msg = (
                f"{index}: the store holds token id {max_id} but the token dictionary has {vocab_size} ids; "
                "data.vocab_dir must be the vocabulary the corpus was tokenized with"
            )
            raise InputError(msg)
    if splits is not None and info["splits"] != splits.as_dict():
        msg = (
            f"{index}: the store was split with {info['splits']} but data.train_split/data.validation_split are "
            f"{splits.as_dict()}; set them to the store's values or rebuild it with those split values"
        )
        raise InputError(msg)
    names = [str(e["path"]) for e in info["parts"]]
    n_train = np.array([e["train_cells"] for e in info["parts"]], dtype=np.int64)
    n_validation = np.array([e["validation_cells"] for e in info["parts"]], dtype=np.int64)

    def split(role: str, counts: np.ndarray, skips: np.ndarray) -> StoreSplit:
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        longest = int(info[role]["longest_cell"]) if info[role]["cells"] else -1
        return StoreSplit(root, role, names, starts, skips, info[role]["sha256"], longest)

    return TrainingStore(
        path=index,
        info=info,
        train=split("train", n_train, np.zeros_like(n_train)),
        validation=split("validation", n_validation, n_train),
    )
