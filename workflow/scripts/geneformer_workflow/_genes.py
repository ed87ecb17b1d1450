"""Gene ids: normalise Ensembl ids, map symbols, and collapse a file's genes onto a gene list."""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_workflow._pickle import load_plain_pickle

log = logging.getLogger(__name__)

_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*[GT]\d+)\.\d+$")


def normalize_gene_ids(ids: np.ndarray, *, strip_version: bool = True) -> np.ndarray:
    """Strip whitespace and (by default) the ``.N`` version suffix of Ensembl ids.

    Upstream Geneformer silently drops versioned ids; we keep them by removing the suffix.

    >>> normalize_gene_ids(np.array(["ENSG00000000003.15", " ENSG00000000005"], dtype=object)).tolist()
    ['ENSG00000000003', 'ENSG00000000005']
    """
    cleaned = pd.Series(ids, dtype=object).astype(str).str.strip()
    if strip_version:
        cleaned = cleaned.str.replace(_ENSEMBL_VERSIONED, r"\1", regex=True)
    return cleaned.to_numpy(dtype=object)


BUILTIN_MAPPINGS = {"grch38": "symbol_to_ensembl_grch38_e93.tsv.gz"}


def load_gene_mapping(path: str | Path) -> dict[str, str]:
    """Read a gene id → Ensembl id mapping.

    ``path`` is a JSON object, a two-column TSV/CSV, Geneformer's pickled ``ensembl_mapping_dict``, or
    ``GRCh38`` for the shipped table of human symbols (GRCh38, Ensembl 93, HGNC previous/alias symbols).
    """
    if str(path).lower() in BUILTIN_MAPPINGS:
        table = resources.files("geneformer_workflow.data") / BUILTIN_MAPPINGS[str(path).lower()]
        with table.open("rb") as fh:
            frame = pd.read_csv(fh, sep="\t", compression="gzip", dtype=str, keep_default_na=False)
        return dict(zip(frame["symbol"], frame["ensembl_id"], strict=True))
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        mapping = load_plain_pickle(path)
    elif path.suffix == ".json":
        mapping = json.loads(path.read_text())
    else:
        sep = "," if path.suffix == ".csv" else "\t"
        table = pd.read_csv(path, sep=sep, dtype=str, comment="#", keep_default_na=False)
        if table.shape[1] < 2:
            msg = f"{path}: a gene mapping table needs two columns (gene id, Ensembl id)"
            raise ValueError(msg)
        mapping = dict(zip(table.iloc[:, 0], table.iloc[:, 1], strict=True))
    return {str(k): str(v) for k, v in mapping.items()}


def map_gene_ids(ids: np.ndarray, mapping: dict[str, str] | None, *, source: str | Path = "") -> np.ndarray:
    """Map ids through ``mapping`` (exact, then upper-cased); ids without an entry are kept as they are."""
    if not mapping:
        return ids
    upper = {k.upper(): v for k, v in mapping.items()}
    mapped = np.array([mapping.get(g, upper.get(g.upper(), g)) for g in ids], dtype=object)
    changed = int((mapped != ids).sum())
    already = int(pd.Index(ids).str.match(r"^ENS[A-Z]*G\d{6,}").sum())
    log.info("%s: mapped %d of %d gene ids to Ensembl ids (%d already were)", source, changed, len(ids), already)
    return mapped


def collapse_matrix(file_gene_ids: np.ndarray, targets: pd.Index) -> sp.csr_matrix:
    """A (n_file_genes, len(targets)) 0/1 matrix summing the file's columns onto ``targets``.

    Columns of the file whose id is not in ``targets`` map nowhere; several columns with the same id
    are summed (upstream Geneformer would emit the token twice).
    """
    position = targets.get_indexer(pd.Index(file_gene_ids))
    rows = np.flatnonzero(position >= 0)
    ones = np.ones(rows.size, dtype=np.float64)
    return sp.csr_matrix((ones, (rows, position[rows])), shape=(len(file_gene_ids), len(targets)))


def report_duplicates(path: Path, ids: np.ndarray) -> int:
    """Warn (with counts) when a file has repeated gene ids, which are summed."""
    duplicated = pd.Index(ids).duplicated()
    n_dup = int(duplicated.sum())
    if n_dup:
        examples = sorted(set(pd.Index(ids)[duplicated]))[:5]
        log.warning("%s: %d duplicate gene ids are summed (e.g. %s)", path, n_dup, examples)
    return n_dup
