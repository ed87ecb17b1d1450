"""Write a seeded synthetic raw-count .h5ad for benchmarks (realistic depth and per-gene detection).

python benchmarks/make_synthetic.py OUT.h5ad --cells 20000 --genes 20000 --genes-per-cell 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
from geneformer_workflow.tokenize.vocab import load_token_dictionary


def gene_ids(n_genes: int, dictionary: Path | None, seed: int) -> list[str]:
    """Ensembl ids: a seeded sample of the V1 dictionary's genes when given, else made-up ids."""
    if dictionary is None:
        return [f"ENSG{i:011d}" for i in range(n_genes)]
    genes = [g for g in load_token_dictionary(dictionary) if g.startswith("ENSG")]
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(genes, size=min(n_genes, len(genes)), replace=False).tolist())


def write_synthetic(
    out: Path,
    n_cells: int,
    n_genes: int,
    genes_per_cell: int,
    dictionary: Path | None,
    seed: int = 0,
    block: int = 5000,
) -> None:
    """Counts: per-gene detection rates ~ Beta, counts 1 + NegBin, about ``genes_per_cell`` genes per cell."""
    rng = np.random.default_rng(seed)
    detection = rng.beta(0.4, 2.0, n_genes)
    detection = np.clip(detection * genes_per_cell / detection.sum(), 0, 1)
    parts = []
    for start in range(0, n_cells, block):
        rows = min(block, n_cells - start)
        mask = rng.random((rows, n_genes), dtype=np.float32) < detection.astype(np.float32)
        r, c = np.nonzero(mask)
        values = (1 + rng.negative_binomial(1, 0.3, r.size)).astype(np.float32)
        parts.append(sp.csr_matrix((values, (r, c)), shape=(rows, n_genes)))
    X = sp.vstack(parts, format="csr")
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    obs["n_counts"] = np.asarray(X.sum(axis=1)).ravel().astype(np.float32)
    var = pd.DataFrame(index=gene_ids(n_genes, dictionary, seed))
    var["ensembl_id"] = var.index
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(out)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--genes-per-cell", type=int, default=2_000)
    parser.add_argument("--token-dictionary", type=Path, default=None, help="take gene ids from this dictionary")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    write_synthetic(args.out, args.cells, args.genes, args.genes_per_cell, args.token_dictionary, args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
