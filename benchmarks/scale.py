"""Scale benchmark of the tokenization-side planning: the gene-median merge and `snakemake -n`.

Sections (each can be skipped; sizes are options):

- **medians**: ``gfw medians --inputs-from LIST`` on 2,000 and 10,000 per-file expression summaries of the
  demo's shape (16,576 genes, 200 cells, about 1,940 detected genes per cell, like
  ``resources/demo``): wall time and peak RSS of the command. ``--distinct`` seeded summaries are written
  and the list cycles through them (writing 10,000 files of 0.9 MB would take longer than the merge); each
  list entry is loaded and merged like any other file.
- **dry-run**: ``snakemake -n --forceall`` of the whole workflow over 2,000 and 10,000 tiny ``.h5ad`` inputs
  (copies of a few seeded files with different cell counts), with a fresh planning cache and again with
  the cache written by the first run.
- **store**: ``benchmarks/scale_store.py`` (the training store), when that file exists; extra arguments
  after ``--store-args`` go to it.

    python benchmarks/scale.py [--summaries 2000 10000] [--inputs 2000 10000] [--skip store] [--workdir DIR]

Prints one table per section; record the machine with the figures (docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from geneformer_workflow.tokenize.medians import ExpressionSummary  # noqa: E402

DEMO_GENES, DEMO_CELLS, DEMO_GENES_PER_CELL = 16_576, 200, 1_940


def run_measured(command: list[str], **kwargs: object) -> tuple[float, float, float, subprocess.CompletedProcess[str]]:
    """Run ``command``; return its wall seconds, CPU seconds, peak RSS in MB (``wait4``'s ``ru_maxrss``), result.

    CPU seconds (user + system) are the figure to compare on a shared machine, where wall time also counts
    the waits for a core.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, **kwargs)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, result


def write_summaries(directory: Path, n: int, *, genes: int, cells: int, genes_per_cell: int) -> list[Path]:
    """``n`` seeded summaries of ``cells`` cells over the same ``genes`` Ensembl ids."""
    gene_ids = np.array([f"ENSG{i:011d}" for i in range(genes)], dtype=object)
    paths = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        detection = rng.beta(0.4, 2.0, genes)
        detection = np.clip(detection * genes_per_cell / detection.sum(), 0, 1)
        rows, cols = np.nonzero(rng.random((cells, genes), dtype=np.float32) < detection.astype(np.float32))
        counts = 1.0 + rng.negative_binomial(1, 0.3, rows.size)
        n_counts = np.bincount(rows, weights=counts, minlength=cells)
        values = counts / n_counts[rows] * 10_000
        path = directory / f"summary-{seed:05d}.npz"
        ExpressionSummary.from_values(gene_ids, cols, values, n_cells=cells).save(path)
        paths.append(path)
    return paths


def bench_medians(workdir: Path, sizes: list[int], args: argparse.Namespace) -> list[dict[str, object]]:
    """Wall time and peak RSS of ``gfw medians`` over ``sizes`` summaries."""
    directory = workdir / "summaries"
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    distinct = write_summaries(
        directory,
        min(args.distinct, max(sizes)),
        genes=args.genes,
        cells=args.cells,
        genes_per_cell=args.genes_per_cell,
    )
    print(f"wrote {len(distinct)} distinct summaries in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for n in sizes:
        listing = workdir / f"summaries-{n}.txt"
        listing.write_text("".join(f"{distinct[i % len(distinct)]}\n" for i in range(n)))
        out = workdir / f"gene_medians-{n}.tsv"
        command = [sys.executable, "-m", "geneformer_workflow", "medians", "--inputs-from", str(listing)]
        wall, cpu, rss, result = run_measured([*command, "-o", str(out), "--overwrite"], env=_package_env())
        if result.returncode:
            sys.exit(f"gfw medians failed on {n} summaries:\n{result.stderr[-3000:]}")
        genes = sum(1 for _ in out.open()) - 1
        rows.append({"summaries": n, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss)})
        rows[-1]["genes"] = genes
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _package_env() -> dict[str, str]:
    scripts = str(REPO / "workflow" / "scripts")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": scripts if not path else f"{scripts}{os.pathsep}{path}"}


def write_inputs(directory: Path, n: int, *, variants: int = 5) -> None:
    """``n`` tiny ``.h5ad`` files: copies of ``variants`` seeded files of different cell counts."""
    from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad

    directory.mkdir(parents=True, exist_ok=True)
    genes = [f"ENSG{i:011d}" for i in range(50)]
    templates = []
    for v in range(variants):
        path = directory.parent / f"template-{v}.h5ad"
        write_counts_h5ad(path, synthetic_counts(20 + 7 * v, len(genes), genes_per_cell=10, seed=v).toarray(), genes)
        templates.append(path)
    for i in range(n):
        shutil.copyfile(templates[i % variants], directory / f"sample_{i:06d}.h5ad")


def bench_dry_run(workdir: Path, sizes: list[int]) -> list[dict[str, object]]:
    """Seconds of ``snakemake -n --forceall`` over ``sizes`` inputs: fresh, then with the planning cache."""
    rows = []
    for n in sizes:
        project = workdir / f"dry-run-{n}"
        if project.exists():
            shutil.rmtree(project)
        start = time.perf_counter()
        write_inputs(project / "data", n)
        print(f"wrote {n} inputs in {time.perf_counter() - start:.0f} s", flush=True)
        (project / "config.yaml").write_text(json.dumps({"inputs": ["data/*.h5ad"], "model": "sanity"}))
        command = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "workflow" / "Snakefile"),
            "--configfile",
            "config.yaml",
            "-n",
            "--forceall",
            "--quiet",
            "rules",
        ]
        row: dict[str, object] = {"inputs": n}
        for label in ("first", "again"):
            wall, cpu, _, result = run_measured(command, cwd=project)
            if result.returncode:
                sys.exit(f"snakemake -n failed on {n} inputs:\n{result.stderr[-3000:]}")
            row[f"{label}_wall_s"], row[f"{label}_cpu_s"] = round(wall, 1), round(cpu, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(project)
    return rows


def bench_store(store_args: list[str]) -> int | None:
    """Run benchmarks/scale_store.py (another section's script) when it exists; its own output is its table."""
    script = HERE / "scale_store.py"
    if not script.is_file():
        print("benchmarks/scale_store.py not found: training store section skipped")
        return None
    return subprocess.run([sys.executable, str(script), *store_args], check=False).returncode


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summaries", type=int, nargs="+", default=[2_000, 10_000], help="summaries per merge")
    parser.add_argument("--distinct", type=int, default=200, help="distinct summary files the lists cycle through")
    parser.add_argument("--genes", type=int, default=DEMO_GENES, help="genes per summary (default: the demo's)")
    parser.add_argument("--cells", type=int, default=DEMO_CELLS, help="cells per summary (default: the demo's)")
    parser.add_argument("--genes-per-cell", type=int, default=DEMO_GENES_PER_CELL, help="detected genes per cell")
    parser.add_argument("--inputs", type=int, nargs="+", default=[2_000, 10_000], help="input files per dry run")
    parser.add_argument(
        "--skip", choices=["medians", "dry-run", "store"], nargs="*", default=[], help="sections to leave out"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--store-args", nargs=argparse.REMAINDER, default=[], help="arguments for scale_store.py")
    args = parser.parse_args()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="gfw-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        tables = {}
        if "medians" not in args.skip:
            tables["medians"] = bench_medians(workdir, args.summaries, args)
        if "dry-run" not in args.skip:
            tables["dry_run"] = bench_dry_run(workdir, args.inputs)
        for name, rows in tables.items():
            print(f"\n{name}")
            for row in rows:
                print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        if "store" not in args.skip:
            status = bench_store(args.store_args)
            if status:
                sys.exit(f"benchmarks/scale_store.py exited with {status}")


if __name__ == "__main__":
    main()
