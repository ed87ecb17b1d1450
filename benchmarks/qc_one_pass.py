"""QC and the gene-median summary of one file: two passes (``gfw qc``, then ``gfw summarize --cell-filter``, the
workflow's ``qc_dataset`` before) against one (``gfw qc --expression-summary``), side by side in one process.

Runs each way ``--repeats`` times, alternating, on a seeded synthetic file (``make_synthetic.py``) or ``--h5ad``;
prints wall and CPU seconds per way and checks that the two summaries hold identical arrays.

    python benchmarks/qc_one_pass.py [--cells 20000 --genes 20000 --genes-per-cell 2000] [--h5ad FILE] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))
sys.path.insert(0, str(HERE))
from geneformer_workflow.tokenize.medians import summarize_h5ad  # noqa: E402
from geneformer_workflow.tokenize.qc import QCThresholds, run_qc  # noqa: E402
from make_synthetic import write_synthetic  # noqa: E402

THRESHOLDS = QCThresholds(None, None, 200, None, 20.0)  # the workflow's defaults


def two_passes(h5ad: Path, out: Path) -> Path:
    run_qc(h5ad, out / "cells.tsv", thresholds=THRESHOLDS, summary_json=out / "summary.json", overwrite=False)
    summarize_h5ad(h5ad, cell_filter=out / "cells.tsv").save(out / "expression.npz")
    return out / "expression.npz"


def one_pass(h5ad: Path, out: Path) -> Path:
    run_qc(h5ad, out / "cells.tsv", thresholds=THRESHOLDS, summary_json=out / "summary.json",
           expression_summary=out / "expression.npz", overwrite=False)  # fmt: skip
    return out / "expression.npz"


def timed(way, h5ad: Path, out: Path) -> tuple[float, float, Path]:
    out.mkdir()
    wall, cpu = time.perf_counter(), time.process_time()
    summary = way(h5ad, out)
    return time.perf_counter() - wall, time.process_time() - cpu, summary


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h5ad", type=Path, help="input file (default: a synthetic one)")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--genes-per-cell", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        h5ad = args.h5ad
        if h5ad is None:
            h5ad = work / "synthetic.h5ad"
            write_synthetic(h5ad, args.cells, args.genes, args.genes_per_cell, None, seed=0)
        times: dict[str, list[tuple[float, float]]] = {"two_passes": [], "one_pass": []}
        summaries = {}
        for repeat in range(args.repeats):
            for name, way in (("two_passes", two_passes), ("one_pass", one_pass)):
                wall, cpu, summaries[name] = timed(way, h5ad, work / f"{name}-{repeat}")
                times[name].append((wall, cpu))
        reference, candidate = arrays(summaries["two_passes"]), arrays(summaries["one_pass"])
        identical = sorted(reference) == sorted(candidate) and all(
            np.array_equal(value, candidate[key]) for key, value in reference.items()
        )
        row = {name: {"wall_s": round(statistics.median(w for w, _ in t), 2),
                      "cpu_s": round(statistics.median(c for _, c in t), 2)} for name, t in times.items()}  # fmt: skip
        row |= {"input": str(args.h5ad or f"synthetic {args.cells} x {args.genes}"), "identical_summary": identical}
        row["speedup_wall"] = round(row["two_passes"]["wall_s"] / row["one_pass"]["wall_s"], 2)
        print(json.dumps(row))
        if not identical:
            sys.exit("the one-pass summary differs from the two-pass one")


if __name__ == "__main__":
    main()
