"""Per-gene medians of normalised expression, from mergeable per-file summaries.

Geneformer normalises a gene's count in a cell by the cell's total (``n_counts``, over all genes) and
scales by 10,000; a gene's *median* is the median of these values over the cells that express it
(nonzero only), across the whole corpus. For an even number of values it is the mean of the two middle
ones: numpy's ``median``, and what Geneformer's t-digest (``crick.TDigest.quantile(0.5)``) returns for a
gene seen in few cells.

Each file is summarised independently (in parallel, chunk by chunk). Per gene, the summary keeps

- the **exact values** (float64, sorted) while the gene is detected in at most ``max_exact`` cells
  (:data:`MAX_EXACT` by default), so the median of a rarely seen gene is exact, bit for bit;
- beyond that bound, an integer **histogram** over log-spaced bins whose edges grow by 1% (``BIN_RATIO``)
  from 1e-3 to 1e4: the median is read off it with log-linear interpolation inside its bin, so its
  relative error is below 1% (at most one bin width); values outside [1e-3, 1e4] (cells with more than
  10 million counts) are clamped to the end bins.

Merging concatenates exact values while the merged count stays within the bound and otherwise bins them
into the (summed) histogram. The merged summary is therefore a function of the corpus's values alone: it
is bit-identical whatever the number, order or split of files (and of chunks within a file). Memory is
bounded per gene: at most ``8 * max_exact`` bytes of exact values or one sparse histogram row (at most
``N_BINS`` bins of 12 bytes), never the corpus.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_workflow.atomic import atomic_path
from geneformer_workflow.progress import Progress
from geneformer_workflow.tokenize._cells import cells_to_keep, load_cell_filter, require_some_cells
from geneformer_workflow.tokenize._median_sketch import (
    BIN_RATIO,
    N_BINS,
    Accumulator,
    bin_index,
    exact_offsets,
    gene_starts,
    histogram_median,
)
from geneformer_workflow.tokenize.genes import (
    collapse_matrix,
    map_gene_ids,
    normalize_gene_ids,
    positions,
    report_duplicates,
)
from geneformer_workflow.tokenize.h5ad import CountChunk, H5adCounts, InputError
from geneformer_workflow.tokenize.median_table import read_gene_medians

__all__ = [
    "BIN_RATIO",
    "FORMAT_VERSION",
    "MAX_EXACT",
    "N_BINS",
    "TARGET_SUM",
    "ExpressionSummary",
    "bin_index",
    "merge_summaries",
    "read_medians",
    "summarize_h5ad",
    "write_medians_tsv",
]

log = logging.getLogger(__name__)

TARGET_SUM = 10_000.0
ENSEMBL_PATTERN = r"^ENS[A-Z]*G\d{6,}$"
# Genes detected in at most this many cells (over all merged files) keep their exact values. Measured
# in docs/tokenization.md ("Gene medians"): 2.5x Geneformer's own exact range (about 100 values for a
# t-digest of compression 100), and 256 float64 values (2 KiB) take no more memory than the histogram
# row that replaces them (a median of 170 occupied bins of 12 bytes on a synthetic 20,000-cell file).
MAX_EXACT = 256
# Version 1 (no such key): histogram only. Version 2: exact values below ``max_exact`` + histogram.
FORMAT_VERSION = 2
_ARRAYS = (
    "format_version",
    "gene_ids",
    "n_detected",
    "exact_values",
    "hist_data",
    "hist_indices",
    "hist_indptr",
    "n_cells",
    "max_exact",
    "bin_ratio",
)


@dataclass
class ExpressionSummary:
    """Normalised nonzero expression per gene: exact values for rarely seen genes, a histogram beyond.

    Attributes:
        gene_ids: Ensembl ids, sorted ascending and unique.
        n_detected: cells in which each gene is detected (int64, one per gene).
        exact_values: float64 values of the genes with ``n_detected <= max_exact``, gene after gene (in
            ``gene_ids`` order), sorted ascending within each gene.
        histogram: int64 CSR (genes x ``N_BINS``) with counts per bin; only the genes with
            ``n_detected > max_exact`` have entries.
        n_cells: kept cells summarised.
        max_exact: the bound on exact values per gene.
    """

    gene_ids: np.ndarray
    n_detected: np.ndarray
    exact_values: np.ndarray
    histogram: sp.csr_matrix
    n_cells: int
    max_exact: int = MAX_EXACT

    @classmethod
    def empty(cls, *, max_exact: int = MAX_EXACT) -> ExpressionSummary:
        """A summary of no cells (the identity of :meth:`merge`)."""
        return cls(
            np.array([], dtype=object),
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.float64),
            sp.csr_matrix((0, N_BINS), dtype=np.int64),
            0,
            max_exact,
        )

    @classmethod
    def from_values(
        cls,
        gene_ids: np.ndarray,
        gene_index: np.ndarray,
        values: np.ndarray,
        *,
        n_cells: int,
        max_exact: int = MAX_EXACT,
    ) -> ExpressionSummary:
        """Summarise observations: ``values[i]`` is a normalised nonzero value of gene ``gene_ids[gene_index[i]]``.

        Args:
            gene_ids: unique gene ids (any order); genes without values are kept with ``n_detected`` 0.
            gene_index: position in ``gene_ids`` of each value's gene.
            values: positive finite normalised values (one per detecting cell and gene).
            n_cells: the number of cells the values come from.
            max_exact: genes with at most this many values keep them exactly.

        Example:
            >>> genes = ["ENSG00000000002", "ENSG00000000001"]
            >>> summary = ExpressionSummary.from_values(genes, [0, 0, 1], [4.0, 1.0, 2.0], n_cells=2)
            >>> summary.medians().to_dict("list")
            {'ensembl_id': ['ENSG00000000001', 'ENSG00000000002'], 'median': [2.0, 2.5], 'n_cells_detected': [1, 2]}
        """
        gene_ids = np.asarray(gene_ids, dtype=str)
        order = np.argsort(gene_ids, kind="stable")
        if np.unique(gene_ids).size != gene_ids.size:
            msg = f"gene ids must be unique ({gene_ids.size - np.unique(gene_ids).size} repeated)"
            raise ValueError(msg)
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        accumulator = Accumulator(gene_ids[order], max_exact)
        rows = rank[np.asarray(gene_index, dtype=np.int64)]
        accumulator.add_values(rows, np.asarray(values, dtype=np.float64), n_cells)
        return cls.from_accumulator(accumulator)

    @classmethod
    def from_accumulator(cls, accumulator: Accumulator) -> ExpressionSummary:
        """The summary of everything added to ``accumulator``."""
        gene_ids, n_detected, exact_values, histogram, n_cells, max_exact = accumulator.finish()
        return cls(gene_ids.astype(object), n_detected, exact_values, histogram, n_cells, max_exact)

    @property
    def exact_offsets(self) -> np.ndarray:
        """Where each gene's exact values start in ``exact_values`` (length: genes + 1)."""
        return exact_offsets(self.n_detected, self.max_exact)

    def is_empty(self) -> bool:
        """No genes and no cells: the identity of :meth:`merge` (its bound does not count)."""
        return self.gene_ids.size == 0 and self.n_cells == 0

    def merge(self, other: ExpressionSummary) -> ExpressionSummary:
        """Combine two summaries over the union of their genes (exact, order- and split-independent).

        The bound of the result is the smaller of the two. :func:`merge_summaries` merges many at once.
        """
        return merge_summaries([self, other])

    def save(self, path: str | Path) -> None:
        """Write as ``.npz`` (no pickled objects), atomically."""
        hist = self.histogram.tocsr()
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                format_version=np.int64(FORMAT_VERSION),
                gene_ids=self.gene_ids.astype(str),
                n_detected=self.n_detected.astype(np.int64),
                exact_values=self.exact_values.astype(np.float64),
                hist_data=hist.data.astype(np.int64),
                hist_indices=hist.indices.astype(np.int32),
                hist_indptr=hist.indptr.astype(np.int64),
                n_cells=np.int64(self.n_cells),
                max_exact=np.int64(self.max_exact),
                bin_ratio=np.float64(BIN_RATIO),
            )

    @classmethod
    def load(cls, path: str | Path) -> ExpressionSummary:
        """Read a summary written by :meth:`save`; refuse other files (older formats too) with a clear message."""
        try:
            archive = np.load(path, allow_pickle=False)
        except (ValueError, zipfile.BadZipFile, EOFError) as err:
            msg = f"{path}: not an expression summary from gfw summarize (.npz) ({err})"
            raise InputError(msg) from err
        if not isinstance(archive, np.lib.npyio.NpzFile):
            msg = f"{path}: not an expression summary from gfw summarize (a single .npy array, not an .npz)"
            raise InputError(msg)
        with archive as z:
            _check_format(path, z)
            genes = z["gene_ids"].astype(object)
            hist = sp.csr_matrix(
                (z["hist_data"], z["hist_indices"], z["hist_indptr"]), shape=(len(genes), N_BINS), dtype=np.int64
            )
            summary = cls(genes, z["n_detected"], z["exact_values"], hist, int(z["n_cells"]), int(z["max_exact"]))
        summary.check(path)
        return summary

    def check(self, source: str | Path = "summary") -> None:
        """Raise :class:`InputError` (naming ``source``) unless the summary's parts agree with each other."""
        n, exact = self.n_detected, self.n_detected <= self.max_exact
        offsets = self.exact_offsets
        problems = []
        try:
            self.histogram.check_format(full_check=True)
        except ValueError as err:
            problems.append(f"histogram: {err}")
        ids = self.gene_ids.astype(str) if self.gene_ids.dtype != object else self.gene_ids  # str objects: no copy
        if ids.size > 1 and not (ids[1:] > ids[:-1]).all():
            problems.append("gene ids are not sorted and unique")
        if n.shape != self.gene_ids.shape or (n < 0).any():
            problems.append("cell counts per gene do not match the genes")
        elif offsets[-1] != self.exact_values.size:
            problems.append(f"{self.exact_values.size} exact values for {offsets[-1]} detections")
        elif not np.array_equal(np.asarray(self.histogram.sum(axis=1)).ravel(), np.where(exact, 0, n)):
            problems.append("histogram totals differ from the cell counts per gene")
        elif self.exact_values.size and not (np.isfinite(self.exact_values).all() and self.exact_values.min() > 0):
            problems.append("exact values must be positive and finite")
        elif np.any(np.diff(self.exact_values)[~gene_starts(offsets)[1:]] < 0):
            problems.append("exact values are not sorted within genes")
        if problems:
            msg = f"{source}: corrupt expression summary: {problems[0]}; rerun gfw summarize"
            raise InputError(msg)

    def medians(self) -> pd.DataFrame:
        """Table of ``ensembl_id``, ``median``, ``n_cells_detected`` for genes seen at least once."""
        n, offsets = self.n_detected, self.exact_offsets
        median = np.full(n.size, np.nan)
        exact = (n > 0) & (n <= self.max_exact)
        lo, hi = offsets[:-1][exact] + (n[exact] - 1) // 2, offsets[:-1][exact] + n[exact] // 2
        # numpy's median: the mean of the two middle values (one value when n is odd: 0.5 * (v + v) == v).
        median[exact] = 0.5 * (self.exact_values[lo] + self.exact_values[hi])
        hist = self.histogram.tocsr()
        for i in np.flatnonzero(n > self.max_exact):
            start, stop = hist.indptr[i], hist.indptr[i + 1]
            bins, counts = hist.indices[start:stop], hist.data[start:stop]
            order = np.argsort(bins)
            median[i] = histogram_median(bins[order], counts[order], int(n[i]))
        seen = n > 0
        table = pd.DataFrame(
            {"ensembl_id": self.gene_ids[seen].astype(str), "median": median[seen], "n_cells_detected": n[seen]}
        )
        return table.sort_values("ensembl_id", ignore_index=True)


def _check_format(path: str | Path, z: np.lib.npyio.NpzFile) -> None:
    if "format_version" not in z.files:
        if {"data", "indices", "indptr", "bin_ratio"} <= set(z.files):
            msg = (
                f"{path}: this expression summary was made by an older version of gfw (histogram only, no exact "
                "values for rarely detected genes); rerun gfw summarize on its .h5ad file (in the workflow: "
                "snakemake --forcerun qc_dataset)"
            )
        else:
            msg = f"{path}: not an expression summary from gfw summarize (arrays: {sorted(z.files)})"
        raise InputError(msg)
    version = int(z["format_version"])
    if version != FORMAT_VERSION:
        age = "an older" if version < FORMAT_VERSION else "a newer"
        msg = (
            f"{path}: expression summary format {version} was made by {age} version of gfw (this one reads "
            f"format {FORMAT_VERSION}); rerun gfw summarize on its .h5ad file with this version"
        )
        raise InputError(msg)
    missing = [name for name in _ARRAYS if name not in z.files]
    if missing:
        msg = f"{path}: corrupt expression summary: no {', '.join(missing)}; rerun gfw summarize"
        raise InputError(msg)
    if float(z["bin_ratio"]) != BIN_RATIO:
        msg = f"{path}: summary made with bin ratio {float(z['bin_ratio'])}, expected {BIN_RATIO}"
        raise InputError(msg)


class FileSummarizer:
    """One file's expression summary, built chunk by chunk: what :func:`summarize_h5ad` streams, and what
    ``gfw qc --expression-summary`` adds in the same pass as the QC metrics (``qc.run_qc``).

    Args:
        reader: the open file.
        gene_mapping: gene id -> Ensembl id, for files with symbols.
        max_exact: genes detected in at most this many cells keep their exact values.

    Raises:
        InputError: when none of the file's gene ids is an Ensembl id (before any chunk is read).
    """

    def __init__(
        self, reader: H5adCounts, *, gene_mapping: dict[str, str] | None = None, max_exact: int = MAX_EXACT
    ) -> None:
        ids = normalize_gene_ids(map_gene_ids(reader.gene_ids, gene_mapping, source=reader.path), source=reader.path)
        report_duplicates(reader.path, ids)
        genes = pd.Index(sorted(set(ids[pd.Index(ids).str.match(ENSEMBL_PATTERN)])))
        if genes.empty:
            msg = (
                f"{reader.path}: none of the {reader.n_vars} gene ids is an Ensembl gene id "
                f"(e.g. {ids[:3].tolist()}); use the var column with Ensembl ids or pass a gene mapping for symbols"
            )
            raise InputError(msg)
        self.reader = reader
        self.collapse = collapse_matrix(positions(ids, genes), len(genes))
        self.total = Accumulator(genes.to_numpy(dtype=object).astype(str), max_exact)

    def add_chunk(self, chunk: CountChunk, keep_rows: np.ndarray) -> None:
        """Add the normalised nonzero values of the chunk's cells where ``keep_rows`` (and the cell has counts)."""
        n_counts = self.reader.n_counts(chunk)
        rows = keep_rows & (n_counts > 0)
        gene_counts = (chunk.matrix[rows] @ self.collapse).tocoo()
        values = gene_counts.data / n_counts[rows][gene_counts.row] * TARGET_SUM
        self.total.add_values(gene_counts.col, values, int(rows.sum()))

    def result(self) -> ExpressionSummary:
        """The summary of every chunk added."""
        return ExpressionSummary.from_accumulator(self.total)


def summarize_h5ad(
    path: str | Path,
    *,
    counts: str = "X",
    gene_id_key: str | None = None,
    gene_mapping: dict[str, str] | None = None,
    cell_filter: str | Path | None = None,
    chunk_size: int = 2048,
    max_exact: int = MAX_EXACT,
) -> ExpressionSummary:
    """Summarise one file's normalised nonzero expression per Ensembl gene, streaming row chunks.

    Args:
        path: the ``.h5ad`` file.
        counts: where the raw counts are (``X``, ``raw`` or ``layers/<name>``).
        gene_id_key: var column with the gene ids (default: the var index).
        gene_mapping: gene id -> Ensembl id, for files with symbols.
        cell_filter: QC table from ``gfw qc``; cells with ``filter_pass`` 0 are skipped.
        chunk_size: cells read per chunk (bounds memory).
        max_exact: genes detected in at most this many cells keep their exact values.
    """
    with H5adCounts(path, counts=counts, gene_id_key=gene_id_key) as reader:
        summarizer = FileSummarizer(reader, gene_mapping=gene_mapping, max_exact=max_exact)
        qc_pass = load_cell_filter(cell_filter, reader) if cell_filter else None
        keep = cells_to_keep(reader, qc_pass)
        require_some_cells(reader, keep)
        progress = Progress(f"medians {reader.path.name}", reader.n_obs, unit="cells")
        for chunk in reader.iter_chunks(chunk_size):
            summarizer.add_chunk(chunk, keep[chunk.start : chunk.stop])
            progress.update(chunk.stop - chunk.start)
        progress.close()
    return summarizer.result()


def merge_summaries(summaries: Iterable[ExpressionSummary]) -> ExpressionSummary:
    """Merge any number of summaries, one at a time (pass a generator to stream them from disk).

    The result does not depend on their order or on how the cells were split between them. Memory:
    the merged state (at most ``8 * max_exact`` bytes of exact values or one histogram row per gene)
    plus the summary being added; exact values are sorted once, at the end.
    """
    total: Accumulator | None = None
    for summary in summaries:
        if summary.is_empty():
            continue
        if total is None:
            total = Accumulator(summary.gene_ids.astype(str), summary.max_exact)
        total.add_summary(
            summary.gene_ids,
            summary.n_detected,
            summary.exact_values,
            summary.histogram,
            summary.n_cells,
            summary.max_exact,
        )
    return ExpressionSummary.empty() if total is None else ExpressionSummary.from_accumulator(total)


def write_medians_tsv(table: pd.DataFrame, path: str | Path) -> None:
    """Write the median table as TSV (full float precision), atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.17g")


def read_medians(path: str | Path) -> pd.Series:
    """Read gene medians (ours as TSV, or Geneformer's pickled dict) as a Series indexed by Ensembl id."""
    return pd.Series(read_gene_medians(path), dtype=np.float64)
