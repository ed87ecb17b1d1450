"""Read a gene median table, ours (TSV) or Geneformer's pickled dict, into a plain ``{gene: median}`` dict.

Kept apart from :mod:`geneformer_workflow.tokenize.medians` (which computes medians with pandas and scipy) so
that ``gfw tokenize`` starts without importing either.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from geneformer_workflow.tokenize._pickle import load_plain_pickle
from geneformer_workflow.tokenize.h5ad import InputError

REQUIRED_COLUMNS = ("ensembl_id", "median")


def read_gene_medians(path: str | Path) -> dict[str, float]:
    """Gene medians by Ensembl id; every median must be a positive finite number."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        raw = load_plain_pickle(path)
        if not isinstance(raw, dict):
            msg = f"{path}: a pickled gene median dictionary must be a dict, not {type(raw).__name__}"
            raise InputError(msg)
        pairs = [(str(gene), value) for gene, value in raw.items()]
    else:
        pairs = _tsv_pairs(path)
    medians: dict[str, float] = {}
    bad: list[str] = []
    for gene, value in pairs:
        try:
            median = float(value)
        except (TypeError, ValueError):
            median = math.nan
        if not (median > 0 and math.isfinite(median)):
            bad.append(gene)
        if gene in medians:
            msg = f"{path}: gene {gene} has more than one median"
            raise InputError(msg)
        medians[gene] = median
    if bad:
        msg = f"{path}: {len(bad)} gene medians are not positive finite numbers (e.g. {bad[0]})"
        raise InputError(msg)
    return medians


def _tsv_pairs(path: Path) -> list[tuple[str, str]]:
    """``(ensembl_id, median)`` of every row of our TSV (other columns ignored)."""
    with open(path, newline="") as fh:
        rows = csv.reader(fh, delimiter="\t")
        header = next(rows, None)
        if header is None or not set(REQUIRED_COLUMNS) <= set(header):
            msg = f"{path}: a gene median table needs the columns ensembl_id and median"
            raise InputError(msg)
        gene, median = header.index("ensembl_id"), header.index("median")
        width = max(gene, median) + 1
        pairs = []
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) < width:
                msg = f"{path}: line {line} has {len(row)} columns, the header {len(header)}"
                raise InputError(msg)
            pairs.append((row[gene], row[median]))
    return pairs
