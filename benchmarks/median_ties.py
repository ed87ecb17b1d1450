"""Gene-median ties on the demo, before and after exact medians for rarely seen genes, side by side.

For each version of the package ("before": the last histogram-only commit, found in git history, or
``--before REV``; "after": this working tree) it runs the real commands on the demo, each in a fresh
Python with that version on ``PYTHONPATH``:

    gfw qc / gfw summarize / gfw medians --gene-mapping GRCh38, gfw vocab, gfw tokenize --preset v1

and reports, from the medians table and the kept cells' ranking values (``((count × (1/n_counts)) ×
10,000) × (1/median)``, the tokenizer's formula, over the vocabulary genes): distinct median values,
agreement with the exact nonzero median (numpy's, over the same values), exactly tied values per cell
(values minus distinct values), and the cells whose 2,048-token cut falls inside a group of tied
values (there the token id, not expression, decides which genes are kept). It checks that every
cell's corpus tokens are the top 2,048 of the analysed values. It also measures ``gfw medians`` over
``--merge-copies`` copies of each version's summary (peak RSS, wall time) and, with
``--synthetic-cells``, summary sizes on a seeded synthetic file for several bounds. When ``crick``
(Geneformer's t-digest) is importable, a third column shows Geneformer's own medians.

    python benchmarks/median_ties.py [--before REV] [--merge-copies 100] [--synthetic-cells 20000]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPTS = REPO / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(HERE))
from geneformer_workflow.presets import get_preset  # noqa: E402
from geneformer_workflow.tokenize._cells import cells_to_keep, load_cell_filter  # noqa: E402
from geneformer_workflow.tokenize.genes import (  # noqa: E402
    collapse_matrix,
    load_gene_mapping,
    map_gene_ids,
    normalize_gene_ids,
    positions,
)
from geneformer_workflow.tokenize.h5ad import H5adCounts  # noqa: E402
from geneformer_workflow.tokenize.median_table import read_gene_medians  # noqa: E402
from geneformer_workflow.tokenize.medians import MAX_EXACT, summarize_h5ad  # noqa: E402
from geneformer_workflow.tokenize.vocab import load_token_dictionary  # noqa: E402

DEMO = REPO / "resources" / "demo" / "pbmc_5k_protein_v3.h5ad"
MAX_GENES = get_preset("v1").max_genes  # 2,048
MEDIANS_PY = "workflow/scripts/geneformer_workflow/tokenize/medians.py"


def git(*args: str) -> str:
    """Output of a git command in the repository."""
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def before_revision() -> str:
    """The parent of the commit that added exact values (``FORMAT_VERSION``), or HEAD while it is uncommitted."""
    added = git("log", "--reverse", "--format=%H", "-S", "FORMAT_VERSION", "--", MEDIANS_PY).splitlines()
    return f"{added[0]}^" if added else "HEAD"


def package_at(revision: str, dest: Path) -> Path:
    """Extract ``workflow/scripts`` of ``revision`` into ``dest``; return its ``workflow/scripts``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "workflow/scripts"], cwd=REPO, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "workflow" / "scripts"


# ``gfw ARGS`` that writes its peak RSS to a file at exit: VmHWM of this process image (the child's
# ru_maxrss would include the parent's memory inherited at fork, e.g. the synthetic file just written).
GFW_REPORTING_PEAK = """
import atexit, sys
def report_peak():
    with open("/proc/self/status") as status:
        peak_kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(sys.argv[1], "w") as out:
        out.write(peak_kb)
atexit.register(report_peak)
from geneformer_workflow.cli import main
sys.exit(main(sys.argv[2:]))
"""


def gfw(scripts: Path, workdir: Path, *args: object) -> tuple[float, float]:
    """Run ``gfw ARGS`` with ``scripts`` on PYTHONPATH; return (wall seconds, peak RSS in MB; Linux)."""
    env = {**os.environ, "PYTHONPATH": str(scripts)}
    log_path, peak_path = workdir / "commands.log", workdir / "peak_kb.txt"
    with open(log_path, "a") as log:
        log.write(f"$ gfw {' '.join(map(str, args))}\n")
        log.flush()
        start = time.perf_counter()
        command = [sys.executable, "-c", GFW_REPORTING_PEAK, str(peak_path), *map(str, args)]
        status = subprocess.run(command, env=env, stdout=log, stderr=log, check=False).returncode
        wall = time.perf_counter() - start
    if status != 0:
        msg = f"gfw {args[0]} failed; see {log_path}:\n{log_path.read_text()[-3000:]}"
        raise RuntimeError(msg)
    return wall, int(peak_path.read_text()) / 1024


def run_demo(scripts: Path, workdir: Path, merge_copies: int) -> dict[str, object]:
    """The demo pipeline with one version of the package; paths of its outputs and the merge measurement."""
    workdir.mkdir(parents=True)
    mapping = ("--gene-mapping", "GRCh38")
    gfw(scripts, workdir, "qc", DEMO, "-o", workdir / "qc.tsv", *mapping)
    gfw(
        scripts,
        workdir,
        "summarize",
        DEMO,
        "-o",
        workdir / "summary.npz",
        "--cell-filter",
        workdir / "qc.tsv",
        *mapping,
    )
    gfw(scripts, workdir, "medians", workdir / "summary.npz", "-o", workdir / "gene_medians.tsv")
    gfw(scripts, workdir, "vocab", workdir / "gene_medians.tsv", "-o", workdir / "vocab", "--preset", "v1")
    gfw(
        scripts,
        workdir,
        "tokenize",
        DEMO,
        workdir / "corpus.parquet",
        "--token-dictionary",
        workdir / "vocab",
        "--gene-medians",
        workdir / "gene_medians.tsv",
        "--preset",
        "v1",
        "--cell-filter",
        workdir / "qc.tsv",
        *mapping,
    )
    copies = workdir / "copies"
    copies.mkdir()
    for i in range(merge_copies):
        (copies / f"s{i:04d}.npz").symlink_to(workdir / "summary.npz")
    wall, rss = gfw(scripts, workdir, "medians", *sorted(copies.iterdir()), "-o", workdir / "merged.tsv")
    return {
        "medians": pd.Series(read_gene_medians(workdir / "gene_medians.tsv")),  # exact floats (pandas' parser is not)
        "corpus": workdir / "corpus.parquet",
        "tokens": load_token_dictionary(workdir / "vocab"),
        "summary_kb": (workdir / "summary.npz").stat().st_size / 1024,
        "merge": (wall, rss),
    }


def demo_cells(qc_tsv: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Kept cells' counts per Ensembl gene (duplicates summed), their ``n_counts`` and the gene ids."""
    with H5adCounts(DEMO) as reader:
        ids = normalize_gene_ids(map_gene_ids(reader.gene_ids, load_gene_mapping("GRCh38")))
        genes = np.array(sorted(set(ids.tolist())), dtype=object)
        collapse = collapse_matrix(positions(ids, genes), len(genes))
        keep = cells_to_keep(reader, load_cell_filter(qc_tsv, reader))
        counts, n_counts = [], []
        for chunk in reader.iter_chunks(4096):
            rows = keep[chunk.start : chunk.stop]
            counts.append((chunk.matrix[rows] @ collapse).tocsr())
            n_counts.append(reader.n_counts(chunk)[rows])
    return sp.vstack(counts, format="csr"), np.concatenate(n_counts), genes


def normalised(counts: sp.csr_matrix, n_counts: np.ndarray) -> sp.csc_matrix:
    """``count / n_counts * 10,000`` per kept cell and gene (``gfw summarize``'s order of operations)."""
    coo = counts.tocoo()
    return sp.csc_matrix((coo.data / n_counts[coo.row] * 10_000, (coo.row, coo.col)), shape=counts.shape)


def exact_medians(counts: sp.csr_matrix, n_counts: np.ndarray, genes: np.ndarray) -> pd.Series:
    """numpy's median of each detected gene's nonzero normalised values."""
    values = normalised(counts, n_counts)
    detected = np.flatnonzero(np.diff(values.indptr))
    medians = [np.median(values.data[values.indptr[j] : values.indptr[j + 1]]) for j in detected]
    return pd.Series(medians, index=genes[detected].astype(str))


def tdigest_medians(counts: sp.csr_matrix, n_counts: np.ndarray, genes: np.ndarray) -> pd.Series | None:
    """Geneformer's medians (``crick.TDigest().quantile(0.5)`` per gene), when crick is installed."""
    try:
        import crick
    except ImportError:
        return None
    values = normalised(counts, n_counts)
    medians = {}
    for j in np.flatnonzero(np.diff(values.indptr)):
        digest = crick.TDigest()
        digest.update(values.data[values.indptr[j] : values.indptr[j + 1]])
        medians[str(genes[j])] = digest.quantile(0.5)
    return pd.Series(medians)


def tie_stats(
    counts: sp.csr_matrix,
    n_counts: np.ndarray,
    genes: np.ndarray,
    medians: pd.Series,
    tokens: dict[str, int],
    corpus: Path | None,
) -> dict[str, float]:
    """Mean exactly tied values per cell, cells whose cut ties, and cells whose corpus tokens agree."""
    ranked = np.array([g in tokens and g in medians.index for g in genes.astype(str)])
    inv_median = np.zeros(len(genes))
    inv_median[ranked] = 1.0 / medians[genes[ranked].astype(str)].to_numpy()
    rows = pq.read_table(corpus, columns=["input_ids"]).column("input_ids").to_pylist() if corpus else None
    position = {tokens[g]: j for j, g in enumerate(genes.astype(str)) if ranked[j]}
    tied, cut, agree = [], 0, 0
    for i in range(counts.shape[0]):
        start, stop = counts.indptr[i], counts.indptr[i + 1]
        cols, cell = counts.indices[start:stop], counts.data[start:stop]
        cell, cols = cell[ranked[cols]], cols[ranked[cols]]
        values = ((cell * (1.0 / n_counts[i])) * 10_000.0) * inv_median[cols]  # the tokenizer's order of operations
        tied.append(values.size - np.unique(values).size)
        ordered = np.sort(values)[::-1]
        cut += int(ordered.size > MAX_GENES and ordered[MAX_GENES - 1] == ordered[MAX_GENES])
        if rows is not None:
            value_of = dict(zip(cols.tolist(), values.tolist(), strict=True))
            kept = sorted((value_of[position[t]] for t in rows[i]), reverse=True)
            agree += int(np.array_equal(kept, ordered[:MAX_GENES]))
    return {"tied": float(np.mean(tied)), "cut": cut, "agree": agree if rows is not None else None}


def synthetic_sizes(n_cells: int, bounds: list[int], before: Path, workdir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """On a seeded synthetic file: ``gfw summarize`` before/after, and the summary per bound (``max_exact``)."""
    from make_synthetic import write_synthetic

    path = workdir / "synthetic.h5ad"
    write_synthetic(path, n_cells, 20_000, 2_000, None, seed=0)
    commands = {}
    for name, scripts in (("before", before), ("after", SCRIPTS)):
        out = workdir / f"synthetic-{name}.npz"
        wall, rss = gfw(scripts, workdir, "summarize", path, "-o", out)
        commands[name] = {"wall s": wall, "peak RSS MB": rss, "npz MB": out.stat().st_size / 1e6}
    rows = []
    for bound in bounds:
        summary = summarize_h5ad(path, max_exact=bound)
        summary.save(workdir / f"synthetic-{bound}.npz")
        hist, n = summary.histogram, summary.n_detected
        in_memory = (
            n.nbytes + summary.exact_values.nbytes + hist.data.nbytes + hist.indices.nbytes + hist.indptr.nbytes
        )
        rows.append(
            {
                "max_exact": bound,
                "npz MB": (workdir / f"synthetic-{bound}.npz").stat().st_size / 1e6,
                "in memory MB": in_memory / 1e6,
                "exact genes": f"{int(((n > 0) & (n <= bound)).sum()):,}/{int((n > 0).sum()):,}",
                "histogram bins per binned gene (median)": np.median(np.diff(hist.indptr)[n > bound])
                if (n > bound).any()
                else 0,
                "distinct medians": f"{summary.medians()['median'].nunique():,}",
            }
        )
    return pd.DataFrame(commands).T, pd.DataFrame(rows)


def demo_table(results: dict[str, dict], qc_tsv: Path, merge_copies: int) -> tuple[pd.DataFrame, str]:
    """Before/after (and Geneformer's t-digest, when crick is installed) side by side; plus a header line."""
    counts, n_counts, genes = demo_cells(qc_tsv)
    exact = exact_medians(counts, n_counts, genes)
    columns = {name: (r["medians"], r["tokens"], r["corpus"]) for name, r in results.items()}
    geneformer = tdigest_medians(counts, n_counts, genes)
    if geneformer is not None:
        columns["Geneformer t-digest"] = (geneformer, results["after"]["tokens"], None)
    table = {}
    for name, (medians, tokens, corpus) in columns.items():
        rel = (medians[exact.index] / exact - 1).abs()
        stats = tie_stats(counts, n_counts, genes, medians, tokens, corpus)
        table[name] = {
            "genes with a median": f"{len(medians):,}",
            "distinct median values": f"{medians.nunique():,}",
            "most genes sharing one median": f"{medians.value_counts().max():,}",
            "medians equal to numpy's exact median": f"{int((rel == 0).sum()):,}",
            "largest relative error vs exact": f"{rel.max():.2%}",
            "exactly tied values per cell (mean)": f"{stats['tied']:.1f}",
            f"cells whose {MAX_GENES:,}-token cut is a tie": f"{stats['cut']}/{counts.shape[0]}",
            "cells whose corpus tokens agree": "-"
            if stats["agree"] is None
            else f"{stats['agree']}/{counts.shape[0]}",
        }
    for name, r in results.items():
        wall, rss = r["merge"]
        table[name]["summary .npz (KB)"] = f"{r['summary_kb']:.0f}"
        table[name][f"gfw medians of {merge_copies} summaries"] = f"{rss:.0f} MB peak, {wall:.1f} s"
    header = f"demo: {DEMO.relative_to(REPO)}, {counts.shape[0]} kept cells, {len(exact):,} detected genes"
    return pd.DataFrame(table).fillna("-"), header


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="git revision of the 'before' code (default: see above)")
    parser.add_argument("--merge-copies", type=int, default=100, help="summaries merged by the memory check")
    parser.add_argument("--synthetic-cells", type=int, default=0, help="cells of the synthetic file (0: skip)")
    parser.add_argument("--bounds", default="0,128,256,512,1024", help="bounds (max_exact) for --synthetic-cells")
    args = parser.parse_args()
    before_rev = args.before or before_revision()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"before: {git('rev-parse', '--short', before_rev)} (histogram only); after: working tree "
        f"(exact values up to {MAX_EXACT} cells per gene)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before_scripts = package_at(before_rev, tmp / "before-src")
        results = {
            "before": run_demo(before_scripts, tmp / "before", args.merge_copies),
            "after": run_demo(SCRIPTS, tmp / "after", args.merge_copies),
        }
        table, header = demo_table(results, tmp / "after" / "qc.tsv", args.merge_copies)
        print(f"{header}\n")
        print(table.to_string())
        if "Geneformer t-digest" not in table.columns:
            print("\n(install crick for a column with Geneformer's own t-digest medians)")
        if args.synthetic_cells:
            bounds = [int(b) for b in args.bounds.split(",")]
            commands, sizes = synthetic_sizes(args.synthetic_cells, bounds, before_scripts, tmp)
            print(f"\nsynthetic file: {args.synthetic_cells:,} cells x 20,000 genes, ~2,000 genes per cell (seed 0)")
            print(commands.to_string(float_format=lambda x: f"{x:.2f}"))
            print()
            print(sizes.to_string(index=False, float_format=lambda x: f"{x:.2f}"))


if __name__ == "__main__":
    main()
