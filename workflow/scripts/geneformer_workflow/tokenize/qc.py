"""Per-cell quality control with scanpy, streamed in row chunks, and the ``filter_pass`` verdict.

Cell metrics are row-local, so computing them chunk by chunk with ``scanpy.pp.calculate_qc_metrics``
gives exactly the whole-file result; so is the verdict (fixed thresholds), which lets ``run_qc`` also build the
file's expression summary for the gene medians in the same pass (``expression_summary``). Mitochondrial genes
are found by symbol prefix (``MT-``) when ``var`` has a symbol column, else by the shipped list of human MT
Ensembl ids (GRCh38, Ensembl 93).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_workflow.atomic import atomic_files, check_outputs
from geneformer_workflow.progress import Progress
from geneformer_workflow.tokenize._cells import filter_pass, require_some_cells
from geneformer_workflow.tokenize.genes import normalize_gene_ids
from geneformer_workflow.tokenize.h5ad import CountChunk, H5adCounts
from geneformer_workflow.tokenize.medians import FileSummarizer

log = logging.getLogger(__name__)

SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "gene_name", "feature_name", "symbol")


@dataclass(frozen=True)
class QCThresholds:
    """Cells pass when every set threshold holds (``None`` = not applied)."""

    min_counts: float | None = None
    max_counts: float | None = None
    min_genes: int | None = 200
    max_genes: int | None = None
    max_pct_mito: float | None = 20.0


def mitochondrial_mask(reader: H5adCounts) -> np.ndarray:
    """Boolean per gene: mitochondrial by ``MT-`` symbol, else by the shipped Ensembl id list."""
    for column in SYMBOL_COLUMNS:
        if column in reader.var.columns:
            return reader.var[column].astype(str).str.upper().str.startswith("MT-").to_numpy()
    table = resources.files("geneformer_workflow.data") / "mitochondrial_genes_grch38.tsv"
    with table.open() as fh:
        mito_ids = set(pd.read_csv(fh, sep="\t", comment="#")["ensembl_id"])
    return np.isin(normalize_gene_ids(reader.gene_ids), list(mito_ids))


def compute_qc_metrics(
    reader: H5adCounts,
    *,
    chunk_size: int = 2048,
    on_chunk: Callable[[CountChunk, pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """Per-cell ``total_counts``, ``n_genes_by_counts`` and ``pct_counts_mt`` (percent).

    ``on_chunk(chunk, metrics)`` is called with each chunk and its cells' metrics, for work in the same pass.
    """
    import anndata as ad
    import scanpy as sc

    var = pd.DataFrame({"mt": mitochondrial_mask(reader)}, index=pd.Index(reader.gene_ids).astype(str))
    var.index = var.index.where(~var.index.duplicated(), var.index + "_dup" + pd.RangeIndex(len(var)).astype(str))
    parts = []
    progress = Progress(f"qc {reader.path.name}", reader.n_obs, unit="cells")
    for chunk in reader.iter_chunks(chunk_size):
        obs = pd.DataFrame(index=pd.Index(reader.cell_ids[chunk.start : chunk.stop]).astype(str))
        adata = ad.AnnData(X=chunk.matrix, obs=obs, var=var)
        metrics, _ = sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=False)
        parts.append(metrics[["total_counts", "n_genes_by_counts", "pct_counts_mt"]])
        if on_chunk is not None:
            on_chunk(chunk, parts[-1])
        progress.update(chunk.stop - chunk.start)
    progress.close()
    table = pd.concat(parts)
    table.index.name = "cell_id"
    return table


def apply_thresholds(
    metrics: pd.DataFrame, thresholds: QCThresholds, input_pass: np.ndarray | None = None
) -> pd.Series:
    """``filter_pass`` (1/0): all thresholds hold and the input's own ``filter_pass`` (if given) is true."""
    ok = np.ones(len(metrics), dtype=bool)
    checks = [
        ("total_counts", thresholds.min_counts, np.greater_equal),
        ("total_counts", thresholds.max_counts, np.less_equal),
        ("n_genes_by_counts", thresholds.min_genes, np.greater_equal),
        ("n_genes_by_counts", thresholds.max_genes, np.less_equal),
        ("pct_counts_mt", thresholds.max_pct_mito, np.less_equal),
    ]
    for column, limit, compare in checks:
        if limit is not None:
            ok &= compare(metrics[column].to_numpy(), limit)
    if input_pass is not None:
        ok &= input_pass
    return pd.Series(ok.astype(np.int8), index=metrics.index, name="filter_pass")


def run_qc(
    path: str | Path,
    out_table: str | Path,
    *,
    thresholds: QCThresholds,
    counts: str = "X",
    gene_id_key: str | None = None,
    summary_json: str | Path | None = None,
    plot: str | Path | None = None,
    expression_summary: str | Path | None = None,
    gene_mapping: dict[str, str] | None = None,
    chunk_size: int = 2048,
    overwrite: bool = True,
) -> dict:
    """QC one file: write the per-cell table (with ``filter_pass``), a JSON summary and a plot.

    With ``expression_summary``, also the file's expression summary over the cells that pass (``.npz``, the same
    file as ``gfw summarize`` with ``--cell-filter`` on the table written here, and ``gene_mapping`` for symbols),
    built in the same pass over the counts; then a file where no cell passes is an error, as for ``gfw summarize``.
    The outputs appear together (the summary JSON, when asked for, last) or not at all; see ``atomic.atomic_files``.
    """
    outputs = [Path(p) for p in (out_table, plot, expression_summary, summary_json) if p]
    check_outputs(outputs, inputs=[path], overwrite=overwrite)
    with H5adCounts(path, counts=counts, gene_id_key=gene_id_key) as reader:
        input_pass = filter_pass(reader) if "filter_pass" in reader.obs_columns else None  # checked first
        summarizer = FileSummarizer(reader, gene_mapping=gene_mapping) if expression_summary else None

        def summarize_chunk(chunk: CountChunk, metrics: pd.DataFrame) -> None:
            chunk_pass = None if input_pass is None else input_pass[chunk.start : chunk.stop]
            summarizer.add_chunk(chunk, apply_thresholds(metrics, thresholds, chunk_pass).to_numpy().astype(bool))

        metrics = compute_qc_metrics(reader, chunk_size=chunk_size, on_chunk=summarize_chunk if summarizer else None)
        metrics["filter_pass"] = apply_thresholds(metrics, thresholds, input_pass)
        if summarizer is not None:
            require_some_cells(reader, metrics["filter_pass"].to_numpy().astype(bool))
    summary = {
        "source": str(path),
        "n_cells": len(metrics),
        "n_cells_kept": int(metrics["filter_pass"].sum()),
        "n_cells_dropped": int(len(metrics) - metrics["filter_pass"].sum()),
        "median_total_counts": float(metrics["total_counts"].median()),
        "median_genes": float(metrics["n_genes_by_counts"].median()),
        "median_pct_mito": float(metrics["pct_counts_mt"].median()),
        "thresholds": asdict(thresholds),
    }
    log.info("%s: %d of %d cells pass QC", path, summary["n_cells_kept"], summary["n_cells"])
    with atomic_files(outputs, inputs=[path], overwrite=overwrite) as tmp:
        metrics.to_csv(tmp[0], sep="\t", float_format="%.6g")
        if plot:
            plot_qc(metrics, thresholds, tmp[outputs.index(Path(plot))], title=Path(path).name)
        if summarizer is not None:
            summarizer.result().save(tmp[outputs.index(Path(expression_summary))])
        if summary_json:
            tmp[-1].write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_qc(metrics: pd.DataFrame, thresholds: QCThresholds, out: str | Path, *, title: str) -> None:
    """Three panels: counts vs genes (kept/dropped), and the distributions of genes and % mito."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = metrics["filter_pass"].to_numpy() == 1
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mask, label, color in ((kept, "kept", "tab:blue"), (~kept, "dropped", "tab:red")):
        axes[0].scatter(metrics["total_counts"][mask], metrics["n_genes_by_counts"][mask], s=6, c=color, label=label)
    axes[0].set(xscale="log", xlabel="total counts per cell", ylabel="genes detected", title="counts vs genes")
    axes[0].legend()
    axes[1].hist(metrics["n_genes_by_counts"], bins=50, color="tab:gray")
    axes[2].hist(metrics["pct_counts_mt"], bins=50, color="tab:gray")
    for ax, limits, label in (
        (axes[1], (thresholds.min_genes, thresholds.max_genes), "genes detected per cell"),
        (axes[2], (thresholds.max_pct_mito,), "% counts from mitochondrial genes"),
    ):
        for limit in limits:
            if limit is not None:
                ax.axvline(limit, color="tab:red", linestyle="--")
        ax.set(xlabel=label, ylabel="cells")
    fig.suptitle(f"{title}: {kept.sum()} of {kept.size} cells kept")
    fig.tight_layout()
    fig.savefig(out, format=Path(out).suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
