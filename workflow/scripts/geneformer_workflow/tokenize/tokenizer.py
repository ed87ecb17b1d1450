"""Rank-value tokenization of an ``.h5ad`` file into a parquet corpus (Geneformer's encoding).

For every kept cell, each gene in the vocabulary gets the value ``count / n_counts * 10000 / median``
(``n_counts`` = the cell's total over ALL genes; the median of the gene's normalised nonzero
expression over the pretraining corpus). Genes are sorted by that value, descending, and the top
``preset.max_genes`` become the cell's tokens (wrapped in ``<cls>`` … ``<eos>`` for v2).

Differences from Geneformer's ``TranscriptomeTokenizer`` (all deliberate, see docs/tokenization.md):
exactly tied values are ordered by ascending token id (upstream: platform-dependent); explicitly
stored zeros never become tokens; duplicate gene ids are summed; versioned Ensembl ids are kept
(suffix stripped); ``n_counts`` is computed when missing; cells with no vocabulary gene are dropped
and counted; the file is streamed in row chunks, so memory does not grow with the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geneformer_workflow.atomic import atomic_files, check_outputs
from geneformer_workflow.presets import CLS, CORPUS_COLUMNS, EOS, Preset
from geneformer_workflow.tokenize._cells import cells_to_keep, load_cell_filter, require_some_cells
from geneformer_workflow.tokenize._corpus import ChunkCounts, CorpusWriter, validation_mask
from geneformer_workflow.tokenize._gene_ranker import GeneRanker
from geneformer_workflow.tokenize._parquet import DEFAULT_ENCODING
from geneformer_workflow.tokenize.corpus_index import CorpusPaths
from geneformer_workflow.tokenize.genes import map_gene_ids, normalize_gene_ids, report_duplicates
from geneformer_workflow.tokenize.h5ad import H5adCounts, InputError
from geneformer_workflow.tokenize.vocab import token_dictionary_sha256

log = logging.getLogger(__name__)

__all__ = ["CorpusPaths", "GeneRanker", "TokenizeStats", "tokenize_h5ad", "validation_mask"]


@dataclass
class TokenizeStats:
    """Counts reported in the manifest and the log."""

    row_start: int = 0
    row_stop: int = 0
    n_cells_input: int = 0
    n_cells_filtered: int = 0
    n_cells_empty: int = 0
    n_cells: int = 0
    n_validation: int = 0
    n_tokens: int = 0
    genes_in_file: int = 0
    genes_matched: int = 0
    counts_total: float = 0.0
    counts_in_vocabulary: float = 0.0


def tokenize_h5ad(
    path: str | Path,
    out_parquet: str | Path,
    *,
    token_dictionary: dict[str, int],
    gene_medians: Mapping[str, float],
    preset: Preset,
    counts: str = "X",
    gene_id_key: str | None = None,
    gene_mapping: dict[str, str] | None = None,
    cell_filter: str | Path | None = None,
    obs_columns: list[str] | None = None,
    validation_fraction: float = 0.05,
    chunk_size: int = 2048,
    rows: tuple[int, int] | None = None,
    threads: int | None = None,
    overwrite: bool = True,
    parquet_encoding: str = DEFAULT_ENCODING,
) -> TokenizeStats:
    """Tokenize one file (or its rows ``rows[0]:rows[1]``) into ``out_parquet`` (+ lengths, manifest), atomically.

    A row range is one shard of a large file, so shards run as parallel jobs; a shard whose cells are
    all filtered out gives an empty corpus (the whole file must keep some cells).

    Three threads overlap by default: one reads and checks the next chunk, the caller's ranks this one,
    one encodes the previous one into parquet (each ~1/3 of the work with AVX-512; h5py, numpy and
    pyarrow release the GIL). ``threads`` above 2 adds ``threads - 2`` ranking threads, for CPUs where
    ranking dominates; the output never depends on it.

    The four output files appear together or not at all (``atomic.atomic_files``, the manifest last); an
    existing output is replaced only with ``overwrite``, and never when it is the input or a directory.
    """
    if preset.special_tokens and not (CLS in token_dictionary and EOS in token_dictionary):
        msg = f"preset {preset.name} needs <cls> and <eos> in the token dictionary (use a v2 vocabulary)"
        raise InputError(msg)
    if not 0 <= validation_fraction < 1:  # also NaN
        msg = f"validation_fraction must be in [0, 1), got {validation_fraction}"
        raise InputError(msg)
    out = CorpusPaths.beside(out_parquet)
    check_outputs(out.all(), inputs=[path, cell_filter], overwrite=overwrite)
    obs_columns = check_obs_columns(obs_columns or [])
    with H5adCounts(path, counts=counts, gene_id_key=gene_id_key) as reader:
        ids = normalize_gene_ids(map_gene_ids(reader.gene_ids, gene_mapping, source=reader.path), source=reader.path)
        report_duplicates(reader.path, ids)
        ranker = GeneRanker(ids, token_dictionary, gene_medians)
        start, stop = _check_rows(rows, reader)
        stats = TokenizeStats(
            start, stop, n_cells_input=stop - start, genes_in_file=len(set(ids)), genes_matched=ranker.n_genes
        )
        if ranker.n_genes == 0 and any(g in token_dictionary for g in ids):
            msg = (
                f"{reader.path}: its genes are in the token dictionary but none has a gene median; the token "
                "dictionary and the gene medians come from different vocabularies — pass the matching pair"
            )
            raise InputError(msg)
        if ranker.n_genes == 0:
            msg = (
                f"{reader.path}: none of its {stats.genes_in_file} gene ids is in the vocabulary "
                f"(e.g. {ids[:3].tolist()}); are the gene ids Ensembl ids? "
                "Set the gene id column or pass a gene mapping"
            )
            raise InputError(msg)
        log.info("%s: %d of %d genes are in the vocabulary", reader.path, ranker.n_genes, stats.genes_in_file)
        keep = cells_to_keep(reader, load_cell_filter(cell_filter, reader) if cell_filter else None)
        require_some_cells(reader, keep)
        stats.n_cells_filtered = int((~keep[start:stop]).sum())
        workers = max(0, (threads or 2) - 2)
        writer = CorpusWriter(
            reader, ranker, keep, preset, token_dictionary, obs_columns, threads=workers, encoding=parquet_encoding
        )
        with atomic_files(out.all(), inputs=[path, cell_filter], overwrite=overwrite) as tmp_files:
            tmp = CorpusPaths(*tmp_files)
            write_id = _write_id(
                path,
                cell_filter,
                token_dictionary,
                gene_medians,
                preset=preset.name,
                counts=counts,
                gene_id_key=gene_id_key,
                gene_mapping=sorted((gene_mapping or {}).items()),
                obs_columns=obs_columns,
                validation_fraction=validation_fraction,
                rows=[start, stop],
                parquet_encoding=parquet_encoding,
            )
            lengths, counts = writer.write(
                tmp.parquet, validation_fraction, chunk_size, rows=(start, stop), write_id=write_id
            )
            _fill_stats(stats, lengths, counts, path)
            _write_sidecars(tmp, out, lengths, stats, preset, token_dictionary, path, validation_fraction, write_id)
    return stats


def _write_id(
    source: str | Path,
    cell_filter: str | Path | None,
    tokens: dict[str, int],
    medians: Mapping[str, float],
    **options: object,
) -> str:
    """A digest of everything a shard depends on: inputs (size, mtime), vocabulary, medians and options.

    Stored in the parquet's metadata and in its manifest, it ties the two to one write. It is deterministic,
    so rerunning a command on unchanged inputs gives byte-identical files.
    """
    hasher = hashlib.sha256()
    for file in (source, cell_filter):
        stat = Path(file).stat() if file is not None else None
        hasher.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode() if stat else b"none;")
    hasher.update(token_dictionary_sha256(tokens).encode())
    hasher.update(json.dumps(sorted((str(k), float(v)) for k, v in medians.items())).encode())
    hasher.update(json.dumps(options, sort_keys=True, default=str).encode())
    return hasher.hexdigest()[:32]


def check_obs_columns(columns: list[str]) -> list[str]:
    """The obs columns to keep, refusing names of the corpus's own columns and repeats.

    Raises:
        InputError: naming the clashing columns and the fix.
    """
    clashes = sorted(set(columns) & set(CORPUS_COLUMNS))
    if clashes:
        msg = (
            f"obs column(s) {clashes} cannot be kept in the corpus: {list(CORPUS_COLUMNS)} are the corpus's own "
            "columns (a table with two columns of one name cannot be read by pandas, datasets or the trainer); "
            "rename them in the AnnData obs, or leave them out of --obs-columns / tokenize.obs_columns"
        )
        raise InputError(msg)
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        msg = f"obs column(s) {repeated} are listed more than once in --obs-columns / tokenize.obs_columns"
        raise InputError(msg)
    return list(columns)


def _fill_stats(stats: TokenizeStats, lengths: np.ndarray, counts: ChunkCounts, path: str | Path) -> None:
    stats.n_cells_empty, stats.n_validation = counts.n_cells_empty, counts.n_validation
    stats.counts_total, stats.counts_in_vocabulary = counts.counts_total, counts.counts_in_vocabulary
    stats.n_cells, stats.n_tokens = int(lengths.size), int(lengths.sum())
    if stats.n_cells_empty:
        log.warning("%s: dropped %d cells with no vocabulary gene expressed", path, stats.n_cells_empty)


def _check_rows(rows: tuple[int, int] | None, reader: H5adCounts) -> tuple[int, int]:
    if rows is None:
        return 0, reader.n_obs
    start, stop = rows
    if not 0 <= start < stop <= reader.n_obs:
        msg = f"{reader.path}: row range {start}:{stop} is outside the file's {reader.n_obs} cells"
        raise InputError(msg)
    return start, stop


def _write_sidecars(
    tmp: CorpusPaths,
    out: CorpusPaths,
    lengths: np.ndarray,
    stats: TokenizeStats,
    preset: Preset,
    tokens: dict[str, int],
    source: str | Path,
    validation_fraction: float,
    write_id: str,
) -> None:
    """Lengths (npy, Geneformer's pickle) and the manifest, into the temporary paths ``tmp``."""
    with open(tmp.lengths_npy, "wb") as fh:
        np.save(fh, lengths)
    with open(tmp.lengths_pkl, "wb") as fh:
        # Geneformer's pretrainer reads `example_lengths_file` as a pickled list of ints.
        pickle.dump([int(x) for x in lengths], fh, protocol=4)
    manifest = {
        "source": str(source),
        "corpus": out.parquet.name,
        "write_id": write_id,  # also in the parquet's metadata: ties the manifest to its file (see _write_id)
        "lengths": [out.lengths_npy.name, out.lengths_pkl.name],
        "preset": preset.name,
        "max_length": preset.max_length,
        "special_tokens": preset.special_tokens,
        "vocab_size": len(tokens),
        "token_dictionary_sha256": token_dictionary_sha256(tokens),
        "validation_fraction": validation_fraction,
        **asdict(stats),
        "mean_length": float(lengths.mean()) if lengths.size else 0.0,
        "count_fraction_in_vocabulary": stats.counts_in_vocabulary / max(stats.counts_total, 1.0),
    }
    tmp.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
