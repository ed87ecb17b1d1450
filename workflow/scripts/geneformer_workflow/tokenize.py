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

import logging
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geneformer_workflow._atomic import atomic_path, write_json_atomic
from geneformer_workflow._cells import cells_to_keep, load_cell_filter, require_some_cells
from geneformer_workflow._corpus import CorpusWriter, validation_mask
from geneformer_workflow._gene_ranker import GeneRanker
from geneformer_workflow._genes import map_gene_ids, normalize_gene_ids, report_duplicates
from geneformer_workflow._io import H5adCounts, InputError
from geneformer_workflow.presets import CLS, EOS, Preset
from geneformer_workflow.vocab import token_dictionary_sha256

log = logging.getLogger(__name__)

__all__ = ["CorpusPaths", "GeneRanker", "TokenizeStats", "tokenize_h5ad", "validation_mask"]


@dataclass
class CorpusPaths:
    """The files written for one tokenized input."""

    parquet: Path
    lengths_npy: Path
    lengths_pkl: Path
    manifest: Path

    @classmethod
    def beside(cls, parquet: str | Path) -> CorpusPaths:
        """``X.parquet`` → ``X.lengths.npy``, ``X.lengths.pkl``, ``X.manifest.json``."""
        parquet = Path(parquet)
        stem = parquet.with_suffix("")
        return cls(parquet, Path(f"{stem}.lengths.npy"), Path(f"{stem}.lengths.pkl"), Path(f"{stem}.manifest.json"))


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
) -> TokenizeStats:
    """Tokenize one file (or its rows ``rows[0]:rows[1]``) into ``out_parquet`` (+ lengths, manifest), atomically.

    A row range is one shard of a large file, so shards run as parallel jobs; a shard whose cells are
    all filtered out gives an empty corpus (the whole file must keep some cells).

    Three threads overlap by default: one reads and checks the next chunk, the caller's ranks this one,
    one encodes the previous one into parquet (each ~1/3 of the work with AVX-512; h5py, numpy and
    pyarrow release the GIL). ``threads`` above 2 adds ``threads - 2`` ranking threads, for CPUs where
    ranking dominates; the output never depends on it.
    """
    if preset.special_tokens and not (CLS in token_dictionary and EOS in token_dictionary):
        msg = f"preset {preset.name} needs <cls> and <eos> in the token dictionary (use a v2 vocabulary)"
        raise InputError(msg)
    out = CorpusPaths.beside(out_parquet)
    with H5adCounts(path, counts=counts, gene_id_key=gene_id_key) as reader:
        ids = normalize_gene_ids(map_gene_ids(reader.gene_ids, gene_mapping, source=reader.path))
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
        writer = CorpusWriter(reader, ranker, keep, preset, token_dictionary, list(obs_columns or []), threads=workers)
        lengths, counts = writer.write(out.parquet, validation_fraction, chunk_size, rows=(start, stop))
    stats.n_cells_empty, stats.n_validation = counts.n_cells_empty, counts.n_validation
    stats.counts_total, stats.counts_in_vocabulary = counts.counts_total, counts.counts_in_vocabulary
    stats.n_cells, stats.n_tokens = int(lengths.size), int(lengths.sum())
    if stats.n_cells_empty:
        log.warning("%s: dropped %d cells with no vocabulary gene expressed", path, stats.n_cells_empty)
    _write_sidecars(out, lengths, stats, preset, token_dictionary, path, validation_fraction)
    return stats


def _check_rows(rows: tuple[int, int] | None, reader: H5adCounts) -> tuple[int, int]:
    if rows is None:
        return 0, reader.n_obs
    start, stop = rows
    if not 0 <= start < stop <= reader.n_obs:
        msg = f"{reader.path}: row range {start}:{stop} is outside the file's {reader.n_obs} cells"
        raise InputError(msg)
    return start, stop


def _write_sidecars(
    out: CorpusPaths,
    lengths: np.ndarray,
    stats: TokenizeStats,
    preset: Preset,
    tokens: dict[str, int],
    source: str | Path,
    validation_fraction: float,
) -> None:
    with atomic_path(out.lengths_npy) as tmp, open(tmp, "wb") as fh:
        np.save(fh, lengths)
    with atomic_path(out.lengths_pkl) as tmp, open(tmp, "wb") as fh:
        # Geneformer's pretrainer reads `example_lengths_file` as a pickled list of ints.
        pickle.dump([int(x) for x in lengths], fh, protocol=4)
    manifest = {
        "source": str(source),
        "corpus": out.parquet.name,
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
    write_json_atomic(out.manifest, manifest)
