"""The report's evaluation figures: the models x scores table (HTML) and one UMAP per model coloured by cell type.

``docs/report.md`` ("Evaluation") says how to read them.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._labels import Labels
from .scores import ScoreSettings

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["plot_label_umaps", "write_scores_html"]

_CSS = (
    "body{font-family:sans-serif;font-size:14px;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}td.best{font-weight:bold}"
)
# Columns shown in the table, with their headers; higher is better for all but n_clusters.
_SHOWN = {
    "kind": "kind",
    "knn_accuracy": "kNN accuracy",
    "knn_macro_f1": "kNN macro-F1",
    "probe_accuracy": "linear probe accuracy",
    "probe_macro_f1": "linear probe macro-F1",
    "leiden_ari": "Leiden ARI",
    "leiden_nmi": "Leiden NMI",
    "n_clusters": "Leiden clusters",
    "label_silhouette": "label silhouette",
    "batch_asw": "batch ASW (mixing)",
    "dimensions": "dimensions",
}
_NOT_RANKED = ("kind", "n_clusters", "dimensions")


def write_scores_html(
    table: pd.DataFrame, out: str | Path, *, dataset: str | Path, labels: Labels, settings: ScoreSettings
) -> None:
    """One HTML table, models x scores, with the cells and classes scored; the best value of each score in bold."""
    shown = {k: v for k, v in _SHOWN.items() if k != "batch_asw" or table["batch_asw"].notna().any()}
    frame = table.set_index("model")[list(shown)]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["model", *shown.values()])
    rows = []
    for model, row in frame.iterrows():
        cells = [f"<td>{html.escape(str(model))}</td>"]
        for key in shown:
            best = key not in _NOT_RANKED and _is_best(frame[key], row[key])
            cells.append(f"<td{' class=best' if best else ''}>{_format(row[key])}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    counts = labels.cell_type.value_counts()
    classes = ", ".join(f"{html.escape(str(name))} {n:,}" for name, n in counts.items())
    batches = ""
    if labels.batch is not None:
        names = ", ".join(map(str, sorted(labels.batch.unique())))
        batches = f"<p>Batches: {labels.batch.nunique():,} ({html.escape(names)})</p>"
    body = (
        f"<p><b>{len(labels.cell_type):,} cells, {labels.n_classes} classes</b> of "
        f"<code>{html.escape(str(dataset))}</code>: {classes}. A constant guess of the largest class is right for "
        f"{counts.iloc[0] / counts.sum():.1%} of the cells.</p>{batches}"
        f"<table><tr>{header}</tr>{''.join(rows)}</table>"
        f"<p>{settings.n_folds}-fold stratified cross-validation (seed {settings.seed}); kNN with "
        f"{settings.n_neighbors} neighbours; Leiden at resolution {settings.leiden_resolution:g} on the "
        f"{settings.n_neighbors}-neighbour graph. Bold: the best model for that score.</p>"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Evaluation</title><style>{_CSS}</style></head>'
        f"<body><h2>Cell-type evaluation: {html.escape(Path(dataset).name)}</h2>{body}</body></html>\n"
    )
    Path(out).write_text(page)


def _is_best(column: pd.Series, value: object) -> bool:
    values = pd.to_numeric(column, errors="coerce")
    return bool(values.notna().any() and isinstance(value, (int, float)) and value == values.max())


def _format(value: object) -> str:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return html.escape(str(value))
    if isinstance(value, (int, np.integer)) or (float(value).is_integer() and abs(value) > 1):
        return f"{int(value):,}"
    return "–" if math.isnan(value) else f"{value:.3f}"


def plot_label_umaps(graphs: dict[str, AnnData], labels: Labels, out: str | Path, *, seed: int = 0) -> None:
    """One UMAP (scanpy) per model, side by side, cells coloured by label with the same colours in every panel.

    Args:
        graphs: Per model, its neighbour graph (``scores.neighbour_graph``), rows in the order of ``labels``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    classes = sorted(labels.cell_type.unique())
    palette = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    colours = {name: palette(i % palette.N) for i, name in enumerate(classes)}
    n_cols = min(3, len(graphs))
    n_rows = -(-len(graphs) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 4.2 * n_rows), squeeze=False)
    size = max(4.0, min(30.0, 6000 / max(len(labels.cell_type), 1)))
    y = labels.cell_type.to_numpy()
    for ax, (name, graph) in zip(axes.ravel(), graphs.items(), strict=False):
        adata = graph.copy()
        sc.tl.umap(adata, random_state=seed)
        xy = adata.obsm["X_umap"]
        for cls in classes:
            rows = y == cls
            ax.scatter(xy[rows, 0], xy[rows, 1], s=size, color=colours[cls], label=cls, linewidths=0)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(graphs) :]:
        ax.set_axis_off()
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[c], label=c) for c in classes]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False, title="cell type")
    fig.suptitle(f"UMAP of each model's embedding, {len(y):,} cells coloured by cell type", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.87, 0.95))
    fig.savefig(out, format=Path(out).suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
