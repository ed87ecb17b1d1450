"""The UMAP of the report: mean cell embeddings coloured by clusters, counts and cell length."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geneformer_workflow.report._common import pyplot, save

__all__ = ["plot_umap"]


def plot_umap(h5ad: str | Path, out: str | Path, *, qc_tables: Sequence[Path] = (), seed: int = 0) -> None:
    """UMAP (scanpy) of ``obsm["X_geneformer_mean"]``, coloured by Leiden clusters (when igraph is installed),
    total counts (from the QC tables) and tokens per cell."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(h5ad)
    colors = _umap_colors(adata, qc_tables)
    plt = pyplot()
    if adata.n_obs < 5:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.text(0.5, 0.5, f"{adata.n_obs} cells: too few for a UMAP", ha="center", va="center")
        ax.set_axis_off()
        save(fig, out)
        return
    sc.pp.neighbors(adata, n_neighbors=min(15, adata.n_obs - 1), use_rep="X_geneformer_mean", random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    if _has_igraph():
        sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
        colors.insert(0, "leiden")
    layer = adata.uns.get("geneformer_embedding", {}).get("layer", "?")
    fig = sc.pl.umap(
        adata, color=colors, show=False, return_fig=True, ncols=2, wspace=0.35, size=max(20, 12000 / adata.n_obs)
    )
    fig.suptitle(f"{adata.n_obs:,} cells, mean embedding of hidden_states[{layer}]", y=1.02)
    save(fig, out, bbox_inches="tight")


def _umap_colors(adata: Any, qc_tables: Sequence[Path]) -> list[str]:
    colors = []
    if qc_tables:
        qc = pd.concat([pd.read_csv(p, sep="\t", index_col=0) for p in qc_tables])
        qc = qc[~qc.index.duplicated()]
        adata.obs["log10 total counts"] = np.log10(qc["total_counts"].reindex(adata.obs_names).to_numpy() + 1)
        colors.append("log10 total counts")
    if "length" in adata.obs:
        adata.obs["tokens per cell"] = adata.obs["length"].astype(float)
        colors.append("tokens per cell")
    if "split" in adata.obs:
        colors.append("split")
    return colors


def _has_igraph() -> bool:
    try:
        import igraph  # noqa: F401 (scanpy's Leiden flavor "igraph" needs only this package)
    except ImportError:
        return False
    return True
