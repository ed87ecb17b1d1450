"""Training store at scale: build throughput, bytes per token, time to first step and anonymous memory per rank.

For each corpus size (default 100,000 and 1,000,000 cells) it writes a synthetic tokenized corpus (parquet
shards like ``gfw tokenize``'s: ``input_ids``, ``length``, ``split`` with 5 % validation cells; cell lengths
drawn V2-like: log-normal, median 1,800 tokens, clipped to 200–4,096), then

1. builds the training store as the workflow does: one ``gfw store part`` process per shard, one after another
   (the jobs run in parallel on a cluster), then ``gfw store index``; reports tokens/s per job, the peak RSS of
   a part job and the store's bytes per token;
2. starts training on the built store in a fresh process (``data.store``, the sanity config: tiny model, 2 cells
   of up to 2,048 tokens per step, 1 process) and reports the time from process start to the end of the first
   optimizer step (imports, trainer setup with the store opened, first batch), and the process's anonymous
   memory (``RssAnon`` in ``/proc/self/status``: not the memory-mapped store pages, which the page cache shares
   between the ranks of a node) after the first step and after a step in the last window of the epoch.

Usage::

    python benchmarks/scale_store.py                         # 100k and 1M cells (about 15 min on 2 cores)
    python benchmarks/scale_store.py --cells 20000 --workdir /tmp/store-bench --keep
    python benchmarks/scale_store.py --cells --many-parts 10000   # index/open/first window of 10,000 parts

Prints a Markdown table (``docs/scale.md``, section "Training store"). Needs ~12 GB of free disk per
million cells under ``--workdir`` (default: a temporary directory, removed at the end).
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
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
VOCAB_SIZE = 20_275  # Geneformer V2
SHARD_CELLS = 100_000
VALIDATION_FRACTION = 0.05

FIRST_STEP = r"""
import json, os, sys, time
started = time.perf_counter()
from geneformer_workflow.train import compose_config
from geneformer_workflow.train.distributed import init_runtime
from geneformer_workflow.train.trainer import Trainer

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
store, vocab, run_dir = sys.argv[1:4]
cfg = compose_config("sanity", [f"data.store={store}", f"data.vocab_dir={vocab}", f"run_dir={run_dir}",
    "training.max_steps=100000", "data.prefetch=false", "wandb.mode=disabled", "logging.console=false"])
runtime = init_runtime("cpu", timeout_s=600)
imported = time.perf_counter()
trainer = Trainer(cfg, runtime)
trainer._reset_interval()
opened = time.perf_counter()
trainer.data.train_micro_batches(0, 0)
data_ready = time.perf_counter()
trainer.train_step()
first = time.perf_counter()
anon_first = anon_mb()
# a step in the epoch's last window: the plan of a window is built on demand, whatever its position
trainer.state.step = trainer.data.sampler.batches_per_epoch - 1
trainer.train_step()
print(json.dumps({"import_s": imported - started, "setup_s": opened - imported, "first_batch_s": data_ready - opened,
                  "first_step_s": first - started, "anon_mb_first": anon_first,
                  "anon_mb_late": anon_mb(), "train_cells": len(trainer.data.train)}))
"""


def synthetic_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """V2-like cell lengths (``<cls>`` + genes + ``<eos>``): log-normal, median 1,800, clipped to 200–4,096."""
    return np.clip(rng.lognormal(np.log(1_800), 0.55, size=n), 200, 4_096).astype(np.int32)


def write_corpus(directory: Path, n_cells: int, *, seed: int, shard_cells: int = SHARD_CELLS) -> list[Path]:
    """Shards of at most ``shard_cells`` cells with random gene ids (store speed does not depend on the ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for k, start in enumerate(range(0, n_cells, shard_cells)):
        n = min(shard_cells, n_cells - start)
        lengths = synthetic_lengths(rng, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = rng.integers(4, VOCAB_SIZE, size=int(offsets[-1]), dtype=np.int32)
        split = np.where(rng.random(n) < VALIDATION_FRACTION, "validation", "train")
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                "length": pa.array(lengths),
                "cell_id": pa.array([f"c{start + i}" for i in range(n)]),
                "split": pa.array(split),
            }
        )
        path = directory / f"shard-{k:04d}.parquet"
        pq.write_table(table, path, row_group_size=2_048)
        shards.append(path)
    return shards


def write_vocab(directory: Path) -> Path:
    sys.path.insert(0, str(SCRIPTS))
    from geneformer_workflow.tokenize.vocab import TOKENIZER_CONFIG, hf_tokenizer_files

    directory.mkdir(parents=True, exist_ok=True)
    names = ["<pad>", "<mask>", "<cls>", "<eos>"] + [f"ENSG{i:011d}" for i in range(VOCAB_SIZE - 4)]
    tokens = {name: i for i, name in enumerate(names)}
    (directory / "token_dictionary.json").write_text(json.dumps(tokens))
    # model_max_length as `gfw vocab` records it (2,048, the length measured so far): data.max_length: null reads it.
    (directory / TOKENIZER_CONFIG).write_text(hf_tokenizer_files(tokens, max_length=2_048)[TOKENIZER_CONFIG])
    return directory


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), out.get("PYTHONPATH")]))
    out.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", OPENBLAS_NUM_THREADS="1")
    return out


# gfw ARGS, then the process's peak RSS (VmHWM: its own, unlike a child's ru_maxrss, which on Linux starts
# from the forking parent's size).
GFW_PEAK = r"""
import sys
from geneformer_workflow.cli import main
code = main(sys.argv[1:])
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"VmHWM {int(peak) / 1024:.1f}")
sys.exit(code)
"""


def gfw(*args: str) -> tuple[float, float]:
    """Run ``gfw ARGS``; returns its wall time and peak RSS in MB."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", GFW_PEAK, *args], env=env(), capture_output=True, text=True)
    if proc.returncode:
        msg = f"gfw {' '.join(args)} failed:\n{proc.stderr}"
        raise SystemExit(msg)
    return time.perf_counter() - started, float(proc.stdout.split("VmHWM")[-1])


def build_store(shards: list[Path], store: Path, vocab: Path) -> dict[str, float]:
    """One ``gfw store part`` process per shard, then ``gfw store index`` (as the workflow's jobs)."""
    part_seconds, part_rss = [], []
    parts = []
    for shard in shards:
        parts.append(store / shard.with_suffix(".json").name)
        seconds, rss = gfw("store", "part", str(shard), "-o", str(parts[-1]), "--vocab-dir", str(vocab))
        part_seconds.append(seconds)
        part_rss.append(rss)
    listing = store / "parts.txt"
    listing.write_text("".join(f"{p}\n" for p in parts))
    index_s, index_rss = gfw("store", "index", "--parts-list", str(listing), "-o", str(store / "store.json"))
    info = json.loads((store / "store.json").read_text())
    tokens = info["train"]["tokens"] + info["validation"]["tokens"]
    store_bytes = sum(p.stat().st_size for p in store.iterdir())
    return {
        "tokens": tokens,
        "part_s": sum(part_seconds),
        "tokens_per_s": tokens / sum(part_seconds),
        "index_s": index_s,
        "bytes_per_token": store_bytes / tokens,
        "part_peak_rss_mb": max(part_rss),
        "index_peak_rss_mb": index_rss,
        "store_gb": store_bytes / 1e9,
    }


def first_step(store: Path, vocab: Path, run_dir: Path) -> dict[str, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_STEP, str(store / "store.json"), str(vocab), str(run_dir)],
        env=env(), capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode:
        msg = f"training failed:\n{proc.stderr}"
        raise SystemExit(msg)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def run(n_cells: int, workdir: Path, vocab: Path, shard_cells: int) -> dict[str, float]:
    base = workdir / f"{n_cells}"
    started = time.perf_counter()
    shards = write_corpus(base / "corpus", n_cells, seed=n_cells, shard_cells=shard_cells)
    generate_s = time.perf_counter() - started
    (base / "store").mkdir()
    result = {"cells": n_cells, "shards": len(shards), "generate_s": generate_s}
    result.update(build_store(shards, base / "store", vocab))
    result.update(first_step(base / "store", vocab, base / "run"))
    shutil.rmtree(base / "corpus")  # keep the disk footprint to one corpus at a time
    return result


def many_parts(n_parts: int, workdir: Path, vocab: Path) -> dict[str, float]:
    """A store of ``n_parts`` tiny parts (a corpus of many small files): index time, open time, a window's lengths."""
    sys.path.insert(0, str(SCRIPTS))
    from geneformer_workflow.tokenize.store import open_store, write_part
    from geneformer_workflow.train.sampler import BatchLayout, ClippedLengths, GlobalBatchSampler

    base = workdir / f"parts-{n_parts}"
    shard = write_corpus(base / "corpus", 20, seed=0)[0]  # one 20-cell shard, converted n_parts times
    parts = [base / "store" / f"d{k // 1000:03d}" / f"shard-{k:05d}.json" for k in range(n_parts)]
    for part in parts:
        write_part(shard, part, vocab_size=VOCAB_SIZE)
    listing = base / "parts.txt"
    listing.write_text("".join(f"{p}\n" for p in parts))
    index_s, index_rss = gfw("store", "index", "--parts-list", str(listing), "-o", str(base / "store" / "store.json"))
    started = time.perf_counter()
    store = open_store(base / "store" / "store.json", vocab_size=VOCAB_SIZE)
    open_s = time.perf_counter() - started
    started = time.perf_counter()
    sampler = GlobalBatchSampler(ClippedLengths(store.train, 4_096), BatchLayout(12, 8, 1), seed=0, window_batches=200)
    batch = sampler.global_batch(0)[1]
    cells = [store.train.cell(int(i)) for i in batch]
    first_window_s = time.perf_counter() - started
    shutil.rmtree(base)
    return {
        "parts": n_parts,
        "train_cells": len(store.train),
        "index_s": index_s,
        "index_peak_rss_mb": index_rss,
        "open_s": open_s,
        "first_window_s": first_window_s,
        "cells_read": len(cells),
    }


def table(results: list[dict[str, float]]) -> str:
    rows = [
        "| cells | tokens | store build (part jobs, 1 core) | tokens/s per job | bytes/token | part job peak RSS | "
        "index (peak RSS) | time to first step | of which imports / trainer setup / first batch | "
        "RssAnon after step 1 | after a late step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['cells']:,} | {r['tokens'] / 1e6:,.0f} M | {r['part_s']:.0f} s ({r['shards']} parts) | "
            f"{r['tokens_per_s'] / 1e6:.0f} M | {r['bytes_per_token']:.3f} | {r['part_peak_rss_mb']:.0f} MB | "
            f"{r['index_s']:.1f} s ({r['index_peak_rss_mb']:.0f} MB) | {r['first_step_s']:.1f} s | "
            f"{r['import_s']:.1f} / {r['setup_s']:.1f} / {r['first_batch_s']:.2f} s | "
            f"{r['anon_mb_first']:.0f} MB | {r['anon_mb_late']:.0f} MB |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="*", default=[100_000, 1_000_000], help="corpus sizes")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--shard-cells", type=int, default=SHARD_CELLS, help="cells per corpus shard (store part)")
    parser.add_argument("--keep", action="store_true", help="keep the stores in --workdir")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--many-parts", type=int, default=0, help="also time a store of this many tiny parts")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gfw-store-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        vocab = write_vocab(workdir / "vocab")
        results = []
        for n in args.cells:
            results.append(run(n, workdir, vocab, args.shard_cells))
            print(json.dumps(results[-1]), flush=True)
        if args.many_parts:
            print(json.dumps(many_parts(args.many_parts, workdir, vocab)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nMachine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
