"""Gene ids: normalise Ensembl ids, map symbols, and collapse a file's genes onto a gene list.

Plain Python and numpy (20,000 ids take milliseconds): the tokenizer's start-up does not pay for pandas.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geneformer_workflow.tokenize._pickle import load_plain_pickle

if TYPE_CHECKING:
    import scipy.sparse as sp

log = logging.getLogger(__name__)

_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*[GT]\d+)\.\d+$")
ENSEMBL_GENE = re.compile(r"^ENS[A-Z]*G\d{6,}")


def normalize_gene_ids(ids: np.ndarray, *, strip_version: bool = True, source: str | Path = "") -> np.ndarray:
    """Strip whitespace and (by default) the ``.N`` version suffix of Ensembl ids.

    Upstream Geneformer silently drops versioned ids; we keep them by removing the suffix, and say how
    many were versioned in the log (``source``, e.g. the file, starts the message).

    >>> normalize_gene_ids(np.array(["ENSG00000000003.15", " ENSG00000000005"], dtype=object)).tolist()
    ['ENSG00000000003', 'ENSG00000000005']
    """
    cleaned = [str(g).strip() for g in ids]
    if strip_version:
        versioned = [g for g in cleaned if "." in g and _ENSEMBL_VERSIONED.match(g)]
        if versioned:
            cleaned = [_ENSEMBL_VERSIONED.sub(r"\1", g) if "." in g else g for g in cleaned]
            log.info(
                "%s%d of %d gene ids are versioned Ensembl ids (e.g. %s); the version is ignored (%s), as "
                "vocabularies hold unversioned ids",
                f"{source}: " if source else "",
                len(versioned),
                len(cleaned),
                versioned[0],
                _ENSEMBL_VERSIONED.sub(r"\1", versioned[0]),
            )
    return np.array(cleaned, dtype=object)


BUILTIN_MAPPINGS = {"grch38": "symbol_to_ensembl_grch38_e93.tsv.gz"}


def load_gene_mapping(path: str | Path) -> dict[str, str]:
    """Read a gene id → Ensembl id mapping.

    ``path`` is a JSON object, a two-column TSV/CSV, Geneformer's pickled ``ensembl_mapping_dict``, or
    ``GRCh38`` for the shipped table of human symbols (GRCh38, Ensembl 93, HGNC previous/alias symbols).
    """
    if str(path).lower() in BUILTIN_MAPPINGS:
        table = resources.files("geneformer_workflow.data") / BUILTIN_MAPPINGS[str(path).lower()]
        with table.open("rb") as raw, gzip.open(raw, "rt", newline="") as fh:
            return {row["symbol"]: row["ensembl_id"] for row in csv.DictReader(fh, delimiter="\t")}
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: gene mapping file not found (or not a file); pass a JSON, TSV/CSV or pickle file, or GRCh38"
        raise ValueError(msg)
    if path.suffix in (".pkl", ".pickle"):
        mapping = load_plain_pickle(path)
    elif path.suffix == ".json":
        mapping = read_json_object(path, "gene mapping", '{"gene id": "Ensembl id", ...}')
    else:
        mapping = _two_column_table(path, "," if path.suffix == ".csv" else "\t")
    bad = next((k for k, v in mapping.items() if not isinstance(v, str)), None)
    if bad is not None:
        msg = f"{path}: the gene mapping maps {bad!r} to {mapping[bad]!r}; the values must be Ensembl ids (text)"
        raise ValueError(msg)
    return {str(k): v for k, v in mapping.items()}


_JSON_TYPES = {list: "an array [...]", str: "a string", int: "a number", float: "a number", bool: "true/false"}


def read_json_object(path: Path, what: str, example: str) -> dict:
    """The JSON object ``{...}`` in ``path``; anything else is a ``ValueError`` naming the file and ``what`` it is.

    Args:
        path: The JSON file.
        what: What the file should be, for messages (e.g. "gene mapping").
        example: The shape of the object it should hold, for messages (e.g. ``{"gene id": "Ensembl id", ...}``).

    Raises:
        ValueError: the file is not UTF-8 text, not valid JSON, or holds another JSON value than an object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        msg = f"{path}: not a text (UTF-8) file, so not a JSON {what}"
        raise ValueError(msg) from err
    except json.JSONDecodeError as err:
        msg = f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); a {what} is {example}"
        raise ValueError(msg) from err
    if not isinstance(value, dict):
        msg = f"{path}: holds {_JSON_TYPES.get(type(value), 'null')}, but a {what} is a JSON object {example}"
        raise ValueError(msg)
    return value


def map_gene_ids(ids: np.ndarray, mapping: dict[str, str] | None, *, source: str | Path = "") -> np.ndarray:
    """Map ids through ``mapping`` (exact, then upper-cased); ids without an entry are kept as they are."""
    if not mapping:
        return ids
    upper = {k.upper(): v for k, v in mapping.items()}
    mapped = np.array([mapping.get(g, upper.get(g.upper(), g)) for g in ids], dtype=object)
    changed = int((mapped != ids).sum())
    already = count_ensembl_ids(ids)
    log.info("%s: mapped %d of %d gene ids to Ensembl ids (%d already were)", source, changed, len(ids), already)
    return mapped


def _two_column_table(path: Path, sep: str) -> dict[str, str]:
    """The first two columns of a delimited text file with a header line (``#`` lines are comments)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        msg = f"{path}: not a text (UTF-8) file, so not a gene mapping table"
        raise ValueError(msg) from err
    lines = (line for line in io.StringIO(text) if line.strip() and not line.startswith("#"))
    rows = list(csv.reader(lines, delimiter=sep))
    if not rows or len(rows[0]) < 2:
        msg = f"{path}: a gene mapping table needs two columns (gene id, Ensembl id)"
        raise ValueError(msg)
    short = next((i for i, row in enumerate(rows[1:], start=2) if len(row) < 2), None)
    if short is not None:
        msg = f"{path}: row {short} of the gene mapping table has fewer than two columns"
        raise ValueError(msg)
    return {row[0]: row[1] for row in rows[1:]}


def positions(ids: Iterable[str], targets: Iterable[str]) -> np.ndarray:
    """The position of every id in ``targets`` (-1: not there)."""
    where = {t: i for i, t in enumerate(targets)}
    ids = list(ids)
    return np.fromiter((where.get(g, -1) for g in ids), dtype=np.int64, count=len(ids))


def count_ensembl_ids(ids: Iterable[object]) -> int:
    """How many of ``ids`` look like Ensembl gene ids."""
    return sum(bool(ENSEMBL_GENE.match(str(g))) for g in ids)


def collapse_matrix(position: np.ndarray, n_targets: int) -> sp.csr_matrix:
    """A (n_file_genes, n_targets) 0/1 matrix summing the file's columns onto their target genes.

    ``position``: every file column's target (:func:`positions`; -1 maps nowhere). Several columns
    with the same target are summed (upstream Geneformer would emit the token twice).
    """
    import scipy.sparse as sp  # only files with duplicate gene ids need it

    rows = np.flatnonzero(position >= 0)
    ones = np.ones(rows.size, dtype=np.float64)
    return sp.csr_matrix((ones, (rows, position[rows])), shape=(len(position), n_targets))


def report_duplicates(path: Path, ids: np.ndarray) -> int:
    """Warn (with counts) when a file has repeated gene ids, which are summed."""
    seen: set[str] = set()
    duplicates = [g for g in ids.tolist() if g in seen or seen.add(g)]
    if duplicates:
        examples = sorted(set(duplicates))[:5]
        log.warning("%s: %d duplicate gene ids are summed (e.g. %s)", path, len(duplicates), examples)
    return len(duplicates)
