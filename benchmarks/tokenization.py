"""Tokenization benchmark: ours vs Geneformer's reference tokenizer, in the same run.

Generates a seeded synthetic raw-count file (default 20,000 cells x 20,000 genes, ~2,000 detected
genes per cell, Ensembl ids from Geneformer's V1 dictionary), then runs each tokenizer as its own
process and prints whole-command wall and CPU time (ours: the ``gfw tokenize`` command line, run in
a fresh Python), steady-state cells/s (the tokenizing loop alone: per wall second and per CPU second,
i.e. per core) and peak RSS. Ours includes reading the file and writing the parquet in its loop;
the reference's loop is ``tokenize_anndata`` on an in-memory AnnData.
``--big-cells 100000`` adds a larger file for ours only, to show memory stays bounded. Every command
runs ``--repeat`` times, alternating ours and the reference, and the table shows medians and, in
"(best)" columns, the fastest run (the machine may be shared: compare numbers from one run only).

    python benchmarks/tokenization.py [--cells 20000] [--big-cells 100000] [--repeat 3] [--threads N]

Needs Geneformer's V1 dictionaries (../shared/geneformer-dictionaries or --dictionaries) and, for the
reference, network access to PyPI once (the helical wheel) plus the `datasets` package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from make_synthetic import write_synthetic  # noqa: E402

OURS = """
import json, sys, time
def peak_rss_mb():
    # VmHWM of this process image (ru_maxrss would include the parent's peak inherited at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from geneformer_workflow.tokenize import _corpus
from geneformer_workflow.cli import main
write, loop = _corpus.CorpusWriter.write, {}
def timed_write(self, *args, **kwargs):  # the streaming loop: read, rank, encode, write
    wall, cpu = time.perf_counter(), time.process_time()
    result = write(self, *args, **kwargs)
    loop.update(loop_s=time.perf_counter() - wall, loop_cpu_s=time.process_time() - cpu, cells=len(result[0]))
    return result
_corpus.CorpusWriter.write = timed_write
h5ad, out, tokens, medians, threads = sys.argv[1:6]
args = ["tokenize", h5ad, out, "--token-dictionary", tokens, "--gene-medians", medians, "--preset", "v1"]
status = main(args + ["--overwrite"] + (["--threads", threads] if int(threads) else []))
if status:
    sys.exit(f"gfw tokenize exited with {status}")
print(json.dumps({**loop, "status": status, "rss_mb": peak_rss_mb()}))
"""

REFERENCE = """
import json, sys, time
def peak_rss_mb():
    # VmHWM of this process image (ru_maxrss would include the parent's peak inherited at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from pathlib import Path
from geneformer_workflow.testing import load_reference_tokenizer_module
h5ad, out, tokens, medians, cache = sys.argv[1:6]
module = load_reference_tokenizer_module(cache)
import scanpy as sc
tk = module.TranscriptomeTokenizer(model_input_size=2048, special_token=False, gene_median_file=medians,
                                   token_dictionary_file=tokens, gene_mapping_file=None, collapse_gene_ids=False)
if sys.argv[6] == "whole":
    tk.tokenize_data(Path(h5ad).parent, out, "reference", file_format="h5ad")
    print(json.dumps({"rss_mb": peak_rss_mb()}))
else:
    adata = sc.read_h5ad(h5ad)
    loop, cpu = time.perf_counter(), time.process_time()
    cells, _ = tk.tokenize_anndata(adata)
    end, cpu_end = time.perf_counter(), time.process_time()
    print(json.dumps({"cells": len(cells), "loop_s": end - loop, "loop_cpu_s": cpu_end - cpu}))
"""


def run(code: str, *args: str) -> tuple[dict, float, float]:
    """Run ``code`` in a fresh Python; return its JSON line, the whole wall time and the whole CPU time."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow" / "scripts")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(result.stdout.strip().splitlines()[-1]), wall, cpu


def ensure_file(path: Path, cells: int, genes: int, dictionary: Path) -> Path:
    """Generate the synthetic file once (seeded, so reruns reuse the same data)."""
    if not path.exists():
        print(f"generating {path} ({cells:,} cells x {genes:,} genes) ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(path, cells, genes, 2_000, dictionary)
    return path


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--big-cells", type=int, default=0, help="also run ours on a file this large (0 = skip)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every command; the table shows medians")
    parser.add_argument("--threads", type=int, default=0, help="ours' --threads (0 = its default, 2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gfw-bench")
    parser.add_argument("--dictionaries", type=Path, default=REPO.parent / "shared" / "geneformer-dictionaries")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    tokens = args.dictionaries / "v1" / "token_dictionary_gc30M.pkl"
    medians = args.dictionaries / "v1" / "gene_median_dictionary_gc30M.pkl"
    work = args.workdir
    small = ensure_file(work / "small" / f"synthetic_{args.cells}.h5ad", args.cells, args.genes, tokens)
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"file {small.stat().st_size / 1e6:.0f} MB; medians of {args.repeat} runs"
    )
    ours_args = (str(small), str(work / "ours.parquet"), str(tokens), str(medians), str(args.threads))
    ref_args = (str(small), str(work / "ref_out"), str(tokens), str(medians), str(work / "helical"))
    ours_runs, ref_runs = [], []
    for _ in range(args.repeat):  # alternate, so a busy spell of a shared machine hits both
        ours_runs.append(run(OURS, *ours_args))
        if not args.skip_reference:
            whole = run(REFERENCE, *ref_args, "whole")
            loop = run(REFERENCE, *ref_args, "loop")[0]
            ref_runs.append(({**loop, "rss_mb": whole[0]["rss_mb"]}, whole[1], whole[2]))
    rows = [("ours", args.cells, *_medians(ours_runs))]
    if ref_runs:
        rows.append(("reference", args.cells, *_medians(ref_runs)))
    if args.big_cells:
        big = ensure_file(work / "big" / f"synthetic_{args.big_cells}.h5ad", args.big_cells, args.genes, tokens)
        big_args = (str(big), str(work / "ours_big.parquet"), str(tokens), str(medians), str(args.threads))
        rows.append(("ours", args.big_cells, *_medians([run(OURS, *big_args) for _ in range(args.repeat)])))
    header = ("tokenizer", "cells", "whole wall s", "(best)", "whole CPU s", "loop cells/s", "loop cells/CPU-s")
    print("{:<10} {:>8} {:>13} {:>7} {:>12} {:>13} {:>17} {:>8} {:>12}".format(*header, "(best)", "peak RSS MB"))
    for name, cells, r, wall_s, cpu_s in rows:
        print(
            f"{name:<10} {cells:>8,} {wall_s:>13.2f} {r['best_wall_s']:>7.2f} {cpu_s:>12.2f} "
            f"{r['cells_per_s']:>13,.0f} {r['cells_per_cpu_s']:>17,.0f} {r['best_cells_per_cpu_s']:>8,.0f} "
            f"{r['rss_mb']:>12,.0f}"
        )
    if ref_runs:
        print(
            f"whole command, ours vs reference: {rows[1][3] / rows[0][3]:.1f}x faster (wall, medians; best runs "
            f"{rows[1][2]['best_wall_s'] / rows[0][2]['best_wall_s']:.1f}x), {rows[1][4] / rows[0][4]:.1f}x less CPU"
        )


def _medians(runs: list[tuple[dict, float, float]]) -> tuple[dict, float, float]:
    """Medians over runs of whole wall and CPU time and of the loop's rates and peak RSS (+ the best rates)."""
    per_cpu = [r["cells"] / r["loop_cpu_s"] for r, _, _ in runs]
    rates = {
        "cells_per_s": statistics.median(r["cells"] / r["loop_s"] for r, _, _ in runs),
        "cells_per_cpu_s": statistics.median(per_cpu),
        "best_cells_per_cpu_s": max(per_cpu),
        "best_wall_s": min(w for _, w, _ in runs),
        "rss_mb": statistics.median(r["rss_mb"] for r, _, _ in runs),
    }
    return rates, statistics.median(w for _, w, _ in runs), statistics.median(c for _, _, c in runs)


if __name__ == "__main__":
    main()
