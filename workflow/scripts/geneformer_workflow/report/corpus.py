"""The corpus outputs of the report: the per-file summary table and the histogram of tokens per cell."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geneformer_workflow.atomic import write_text_atomic
from geneformer_workflow.report._common import html_page, pyplot, save, table_html

__all__ = ["plot_cell_lengths", "write_corpus_summary"]


def _manifest_of(parquet: Path) -> dict[str, Any]:
    """The ``X.manifest.json`` beside ``X.parquet`` (written by ``gfw tokenize``), or {}."""
    path = Path(f"{parquet.with_suffix('')}.manifest.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def _dataset_name(source: str) -> str:
    return Path(source).name.removesuffix(".h5ad")


def write_corpus_summary(qc_summaries: list[Path], manifests: list[Path], out: str | Path) -> pd.DataFrame:
    """One row per input file: QC (kept / dropped), genes mapped, corpus cells and tokens; plus the vocabulary.

    Args:
        qc_summaries: ``summary.json`` files of ``gfw qc``.
        manifests: ``*.manifest.json`` of every corpus shard (``gfw tokenize``); shards of a file are summed.
        out: HTML page to write.

    Returns:
        The per-file table.
    """
    qc = {_dataset_name(s["source"]): s for s in (json.loads(Path(p).read_text()) for p in qc_summaries)}
    shards = pd.DataFrame([json.loads(Path(p).read_text()) for p in manifests])
    if shards.empty:
        msg = f"no corpus manifests given to write {out}; pass the tokenize step's *.manifest.json files"
        raise ValueError(msg)
    shards["dataset"] = shards["source"].map(_dataset_name)
    rows = []
    for name, part in shards.groupby("dataset", sort=True):
        first, qc_row = part.iloc[0], qc.get(name, {})
        rows.append(
            {
                "dataset": name,
                "cells in file": int(qc_row.get("n_cells", part["n_cells_input"].sum())),
                "dropped by QC": int(qc_row.get("n_cells_dropped", part["n_cells_filtered"].sum())),
                "dropped empty": int(part["n_cells_empty"].sum()),
                "cells in corpus": int(part["n_cells"].sum()),
                "validation cells": int(part["n_validation"].sum()),
                "median counts": qc_row.get("median_total_counts", math.nan),
                "median genes": qc_row.get("median_genes", math.nan),
                "median % mito": qc_row.get("median_pct_mito", math.nan),
                "genes in file": int(first["genes_in_file"]),
                "genes mapped to vocabulary": int(first["genes_matched"]),
                "% genes mapped": 100.0 * first["genes_matched"] / max(first["genes_in_file"], 1),
                "% counts on vocabulary": 100.0
                * part["counts_in_vocabulary"].sum()
                / max(part["counts_total"].sum(), 1),
                "tokens": int(part["n_tokens"].sum()),
                "mean tokens per cell": part["n_tokens"].sum() / max(part["n_cells"].sum(), 1),
            }
        )
    table = pd.DataFrame(rows).set_index("dataset")
    first = shards.iloc[0]
    vocab = {
        "vocabulary size (tokens)": f"{int(first['vocab_size']):,}",
        "preset": f"{first['preset']} ({int(first['max_length']):,} tokens per cell at most)",
        "special tokens": "<pad>, <mask>, <cls>, <eos>" if first["special_tokens"] else "<pad>, <mask>",
        "token dictionary sha256": str(first["token_dictionary_sha256"]),
    }
    thresholds = next(iter(qc.values()), {}).get("thresholds", {})
    body = (
        table_html(table.rename_axis(None).astype(object).T)  # one column per file: reads down
        + "<h3>Vocabulary</h3>"
        + table_html(pd.Series(vocab, name="value").to_frame())
        + "<h3>QC thresholds (null = not applied)</h3>"
        + table_html(
            pd.Series({k: "null" if v is None else v for k, v in thresholds.items()}, name="value").to_frame()
        )
    )
    write_text_atomic(out, html_page("Corpus summary", body))
    return table


def plot_cell_lengths(corpus: list[Path], out: str | Path) -> None:
    """Histogram of tokens per cell, one step curve per input file, with the preset's maximum as a dashed line."""
    import pyarrow.parquet as pq

    lengths: dict[str, list[np.ndarray]] = {}
    max_length = None
    for path in map(Path, corpus):
        manifest = _manifest_of(path)
        name = _dataset_name(manifest["source"]) if "source" in manifest else path.parent.name
        max_length = manifest.get("max_length", max_length)
        lengths.setdefault(name, []).append(pq.read_table(path, columns=["length"]).column("length").to_numpy())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    every = np.concatenate([a for parts in lengths.values() for a in parts]) if lengths else np.zeros(0)
    bins = np.linspace(0, max(int(every.max(initial=1)), max_length or 1), 60)
    for name, parts in lengths.items():
        ax.hist(np.concatenate(parts), bins=bins, histtype="step", linewidth=1.5, label=name)
    if max_length:
        ax.axvline(max_length, color="tab:red", linestyle="--", label=f"maximum ({max_length:,})")
    ax.set(xlabel="tokens per cell (genes ranked; special tokens included)", ylabel="cells")
    at_max = float(np.mean(every >= max_length)) * 100 if max_length and every.size else 0.0
    median = float(np.median(every)) if every.size else math.nan
    ax.set_title(f"{every.size:,} cells: median {median:,.0f} tokens, {at_max:.1f} % at the maximum (truncated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out)
