"""Helpers for tests and examples: tiny AnnData files with hand-checkable counts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def write_counts_h5ad(
    path: str | Path,
    counts: np.ndarray,
    gene_ids: list[str],
    *,
    matrix_format: str = "csr",
    where: str = "X",
    obs: pd.DataFrame | None = None,
    var: pd.DataFrame | None = None,
    cell_ids: list[str] | None = None,
) -> Path:
    """Write ``counts`` (cells x genes) as an ``.h5ad`` with the counts in ``X``, ``raw`` or ``layers/<name>``.

    Args:
        matrix_format: ``csr``, ``csc`` or ``dense``.
        where: ``X``, ``raw`` or ``layers/<name>`` (the other slots get a log-normalised copy, as real files do).
    """
    counts = np.asarray(counts, dtype=np.float32)
    convert = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[matrix_format]
    cells = cell_ids or [f"cell{i}" for i in range(counts.shape[0])]
    obs = obs.copy() if obs is not None else pd.DataFrame(index=cells)
    obs.index = pd.Index(cells)
    var = var.copy() if var is not None else pd.DataFrame(index=gene_ids)
    var.index = pd.Index(gene_ids)
    positive = np.nan_to_num(np.clip(counts, 0, None))
    log_norm = np.log1p(positive / np.maximum(positive.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    adata = ad.AnnData(X=convert(counts if where == "X" else log_norm), obs=obs, var=var)
    if where == "raw":
        adata.raw = ad.AnnData(X=convert(counts), obs=obs, var=var)
    elif where.startswith("layers/"):
        adata.layers[where.split("/", 1)[1]] = convert(counts)
    path = Path(path)
    adata.write_h5ad(path)
    return path


def synthetic_counts(n_cells: int, n_genes: int, *, genes_per_cell: int = 200, seed: int = 0) -> sp.csr_matrix:
    """Seeded raw counts with realistic sparsity: about ``genes_per_cell`` detected genes per cell."""
    rng = np.random.default_rng(seed)
    detection = rng.beta(0.3, 3.0, n_genes)
    detection *= genes_per_cell / detection.sum()
    mask = rng.random((n_cells, n_genes)) < np.clip(detection, 0, 1)
    rows, cols = np.nonzero(mask)
    values = 1 + rng.negative_binomial(1, 0.4, rows.size)
    return sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=(n_cells, n_genes))


REFERENCE_WHEEL = "helical==2.2.0"
REFERENCE_MEMBER = "helical/models/geneformer/geneformer_tokenizer.py"


def load_reference_tokenizer_module(cache_dir: str | Path) -> ModuleType:
    """Geneformer's ``TranscriptomeTokenizer`` as published inside the ``helical`` wheel on PyPI.

    Downloads the wheel into ``cache_dir`` on first use (nothing is committed to this project) and
    imports the one tokenizer file from it. Needs ``datasets`` and ``scanpy``.

    Raises:
        RuntimeError: the wheel cannot be downloaded (e.g. offline).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "geneformer_tokenizer.py"
    if not source.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", REFERENCE_WHEEL, "-d", str(cache), "-q"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        wheels = sorted(cache.glob("helical-*.whl"))
        if result.returncode or not wheels:
            msg = f"cannot download {REFERENCE_WHEEL}: {result.stderr[-300:]}"
            raise RuntimeError(msg)
        with zipfile.ZipFile(wheels[0]) as wheel:
            source.write_bytes(wheel.read(REFERENCE_MEMBER))
    spec = importlib.util.spec_from_file_location("reference_geneformer_tokenizer", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
