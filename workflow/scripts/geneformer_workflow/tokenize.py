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
import logging
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from geneformer_workflow._atomic import atomic_path, write_json_atomic
from geneformer_workflow._cells import cells_to_keep, load_cell_filter, require_some_cells
from geneformer_workflow._genes import collapse_matrix, map_gene_ids, normalize_gene_ids, report_duplicates
from geneformer_workflow._io import CountChunk, H5adCounts, InputError
from geneformer_workflow._parquet import ParquetSink
from geneformer_workflow._ranking import key_layout, rank_block
from geneformer_workflow.presets import CLS, EOS, Preset
from geneformer_workflow.progress import Progress
from geneformer_workflow.vocab import token_dictionary_sha256

log = logging.getLogger(__name__)

TARGET_SUM = 10_000.0
BLOCK_ENTRIES = 32_768  # nonzeros ranked at once (fits in L2 cache)


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


class GeneRanker:
    """Precomputed per-file state: file columns → vocabulary genes, and ``1 / median`` per gene.

    Local gene indices follow ascending token id, so ties in value are broken by token id.
    """

    def __init__(self, file_gene_ids: np.ndarray, token_dictionary: dict[str, int], medians: pd.Series) -> None:
        usable = sorted(
            (token_dictionary[g], g) for g in set(file_gene_ids) if g in token_dictionary and g in medians.index
        )
        self.token_ids = np.array([t for t, _ in usable], dtype=np.int32)
        genes = pd.Index([g for _, g in usable])
        self.inv_median = 1.0 / medians.reindex(genes).to_numpy(np.float64)
        self.column_gene = genes.get_indexer(pd.Index(file_gene_ids))  # file column -> local gene (-1: none)
        mapped = self.column_gene[self.column_gene >= 0]
        # Several columns with one id must be summed first (a sparse product); otherwise a lookup suffices.
        self.collapse = collapse_matrix(file_gene_ids, genes) if len(np.unique(mapped)) < mapped.size else None

    @property
    def n_genes(self) -> int:
        """Number of the file's genes that can become tokens."""
        return len(self.token_ids)

    def rank(self, counts: sp.csr_matrix, n_counts: np.ndarray, max_genes: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of every row (cell), highest normalised value first, at most ``max_genes`` per row.

        Rows are processed in blocks of about ``BLOCK_ENTRIES`` nonzeros, so every pass stays in cache.

        Returns:
            ``(tokens, lengths)``: the concatenated token ids (int32) and the count per row.
        """
        if self.collapse is not None:
            counts = sp.csr_matrix(counts @ self.collapse)
            column_gene = np.arange(self.n_genes)
        else:
            column_gene = self.column_gene
        n_rows, indptr = counts.shape[0], counts.indptr
        gene_bits, max_block = key_layout(max(self.n_genes, 1))
        block = int(min(max_block, max(1, BLOCK_ENTRIES * n_rows // max(int(indptr[-1]), 1))))
        inv_n = 1.0 / n_counts
        tokens, lengths = [], np.zeros(n_rows, dtype=np.int32)
        for r0 in range(0, n_rows, block):
            r1 = min(n_rows, r0 + block)
            lo, hi = indptr[r0], indptr[r1]
            gene = column_gene[counts.indices[lo:hi]]
            row = np.repeat(np.arange(r1 - r0), np.diff(indptr[r0 : r1 + 1]))
            data = counts.data[lo:hi]
            kept = gene >= 0
            if not kept.all():
                row, gene, data = row[kept], gene[kept], data[kept]
            # Upstream order of float64 operations: ((x * (1/n)) * 10000) * (1/median).
            values = ((data * inv_n[r0:r1][row]) * TARGET_SUM) * self.inv_median[gene]
            ranked = rank_block(row, gene, values, gene_bits)
            per_row = np.bincount(row, minlength=r1 - r0)
            if per_row.size and per_row.max() > max_genes:
                ranked = ranked[_within_limit(per_row, max_genes)]
            tokens.append(self.token_ids[ranked])
            lengths[r0:r1] = np.minimum(per_row, max_genes)
        return (np.concatenate(tokens) if tokens else np.empty(0, np.int32)), lengths


def _within_limit(per_row: np.ndarray, max_genes: int) -> np.ndarray:
    """Mask of the first ``max_genes`` entries of every row, for rows laid out back to back."""
    ends = np.cumsum(per_row)
    mask = np.ones(int(ends[-1]), dtype=bool)
    for end, n in zip(ends[per_row > max_genes], per_row[per_row > max_genes], strict=True):
        mask[end - n + max_genes : end] = False
    return mask


def validation_mask(cell_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic train/validation split by cell id (a hash, so stable across runs and files)."""
    if fraction <= 0:
        return np.zeros(len(cell_ids), dtype=bool)
    limit = int(fraction * 2**64)
    digests = [int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=8).digest(), "little") for c in cell_ids]
    return np.array(digests, dtype=np.uint64) < np.uint64(min(limit, 2**64 - 1))


def _obs_table(obs: pd.DataFrame, columns: list[str], path: Path) -> pa.Table:
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        msg = f"{path}: obs has no column(s) {missing} to keep (available: {list(obs.columns)})"
        raise InputError(msg)
    frame = obs[columns].reset_index(drop=True)
    for col in columns:
        if isinstance(frame[col].dtype, pd.CategoricalDtype):
            frame[col] = frame[col].astype(str)
    return pa.Table.from_pandas(frame, preserve_index=False)


def _wrap_special(tokens: np.ndarray, lengths: np.ndarray, cls: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``<cls>`` before and ``<eos>`` after every row of the flat token array."""
    new_lengths = lengths + 2
    ends = np.cumsum(new_lengths)
    out = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.int32)
    is_gene = np.ones(out.size, dtype=bool)
    is_gene[ends - new_lengths] = False
    is_gene[ends - 1] = False
    out[ends - new_lengths], out[ends - 1] = cls, eos
    out[is_gene] = tokens
    return out, new_lengths.astype(np.int32)


def tokenize_h5ad(
    path: str | Path,
    out_parquet: str | Path,
    *,
    token_dictionary: dict[str, int],
    gene_medians: pd.Series,
    preset: Preset,
    counts: str = "X",
    gene_id_key: str | None = None,
    gene_mapping: dict[str, str] | None = None,
    cell_filter: str | Path | None = None,
    obs_columns: list[str] | None = None,
    validation_fraction: float = 0.05,
    chunk_size: int = 2048,
    rows: tuple[int, int] | None = None,
) -> TokenizeStats:
    """Tokenize one file (or its rows ``rows[0]:rows[1]``) into ``out_parquet`` (+ lengths, manifest), atomically.

    A row range is one shard of a large file, so shards run as parallel jobs; a shard whose cells are
    all filtered out gives an empty corpus (the whole file must keep some cells).
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
        writer = _CorpusWriter(reader, ranker, keep, preset, token_dictionary, list(obs_columns or []))
        lengths = writer.write(out.parquet, validation_fraction, chunk_size, stats, rows=(start, stop))
    _write_sidecars(out, lengths, stats, preset, token_dictionary, path, validation_fraction)
    return stats


class _CorpusWriter:
    """Tokenizes one open file chunk by chunk into parquet row groups."""

    def __init__(
        self,
        reader: H5adCounts,
        ranker: GeneRanker,
        keep: np.ndarray,
        preset: Preset,
        tokens: dict[str, int],
        obs_columns: list[str],
    ) -> None:
        self.reader, self.ranker, self.keep, self.preset, self.tokens = reader, ranker, keep, preset, tokens
        self.obs_table = _obs_table(reader.obs, obs_columns, reader.path)
        self.cell_ids = reader.obs.index.astype(str).to_numpy()
        fixed = [("input_ids", pa.list_(pa.int32())), ("length", pa.int32()), ("cell_id", pa.string())]
        self.schema = pa.schema([*fixed, ("split", pa.string()), *self.obs_table.schema])

    def write(
        self, target: Path, validation_fraction: float, chunk_size: int, stats: TokenizeStats, *, rows: tuple[int, int]
    ) -> np.ndarray:
        """Write the corpus of ``rows`` to ``target`` atomically; return the lengths of the written cells."""
        all_lengths = []
        start, stop = rows
        progress = Progress(f"tokenize {self.reader.path.name}[{start}:{stop}]", stop - start, unit="cells")
        with atomic_path(target) as tmp:
            with ParquetSink(tmp, self.schema) as writer:
                for chunk in self.reader.iter_chunks(chunk_size, start=start, stop=stop):
                    table = self._chunk(chunk, validation_fraction, stats)
                    if table is not None:
                        writer.write(table)
                        all_lengths.append(table.column("length").to_numpy())
                    progress.update(chunk.stop - chunk.start)
            progress.close()
            if not all_lengths and (start, stop) == (0, self.reader.n_obs):
                msg = f"{self.reader.path}: no cell has any vocabulary gene with a nonzero count; nothing to tokenize"
                raise InputError(msg)
        lengths = np.concatenate(all_lengths).astype(np.int32) if all_lengths else np.zeros(0, np.int32)
        if stats.n_cells_empty:
            log.warning(
                "%s: dropped %d cells with no vocabulary gene expressed", self.reader.path, stats.n_cells_empty
            )
        stats.n_cells, stats.n_tokens = int(lengths.size), int(lengths.sum())
        return lengths

    def _chunk(self, chunk: CountChunk, validation_fraction: float, stats: TokenizeStats) -> pa.Table | None:
        n_counts = self.reader.n_counts(chunk)
        wanted = self.keep[chunk.start : chunk.stop]
        rows = wanted & (n_counts > 0)
        counts = chunk.matrix[rows]
        stats.counts_total += float(counts.data.sum())
        stats.counts_in_vocabulary += float(counts.data[self.ranker.column_gene[counts.indices] >= 0].sum())
        tokens, lengths = self.ranker.rank(counts, n_counts[rows], self.preset.max_genes)
        nonempty = lengths > 0
        stats.n_cells_empty += int((~nonempty).sum()) + int((wanted & ~rows).sum())
        index = chunk.start + np.flatnonzero(rows)[nonempty]
        if not index.size:
            return None
        lengths = lengths[nonempty]
        if self.preset.special_tokens:
            tokens, lengths = _wrap_special(tokens, lengths, self.tokens[CLS], self.tokens[EOS])
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens))
        is_val = validation_mask(self.cell_ids[index], validation_fraction)
        stats.n_validation += int(is_val.sum())
        split = pa.array(np.where(is_val, "validation", "train"))
        columns = [input_ids, pa.array(lengths), pa.array(self.cell_ids[index]), split]
        return pa.Table.from_arrays([*columns, *self.obs_table.take(pa.array(index)).columns], schema=self.schema)


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
