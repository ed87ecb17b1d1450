"""Padding waste and non-pad tokens/s: plain random batches vs the engine's length-grouped batches.

Two ways to cut an epoch of cells into micro-batches, each padded to its longest cell (rounded up to
``--pad-to-multiple-of``, as the engine's collator does):

* ``random``: a seeded shuffle cut into consecutive micro-batches (a plain ``DataLoader(shuffle=True)``);
* ``grouped``: the engine's plan, :class:`geneformer_workflow.train.sampler.GlobalBatchSampler` (shuffle, sort by
  length inside windows of ``window_batches`` global batches, cut, shuffle the batches), for every step and rank.

Padding waste (fraction of pad slots) is computed over a whole epoch for several micro-batch sizes and windows.
Non-pad tokens/s times forward + backward + AdamW of a model (default: the sanity shape, ``--model 10m`` for
Geneformer V1's size) on ``--steps`` micro-batches of each plan, alternating between the plans so machine load
hits both alike. Length distributions: the training cells of a tokenized corpus (default: the demo corpus in
``results/tokenized``, else the demo h5ad is tokenized with ``gfw`` into a temporary directory), plus two seeded
synthetic long-tailed ones (log-normal).

    .venv/bin/python benchmarks/batching.py                         # demo corpus + synthetic, sanity model
    .venv/bin/python benchmarks/batching.py --corpus results/tokenized --model 10m --steps 4
    .venv/bin/python benchmarks/batching.py --no-synthetic --steps 0   # padding waste only (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from geneformer_workflow.model import GeneformerForMaskedLM, ModelConfig  # noqa: E402
from geneformer_workflow.train.sampler import BatchLayout, GlobalBatchSampler  # noqa: E402

DEMO_H5AD = REPO / "resources" / "demo" / "pbmc_5k_protein_v3.h5ad"
DEFAULT_CORPUS = REPO / "results" / "tokenized"
VOCAB_SIZE = 25_426  # Geneformer V1; the ids are random, only the shapes matter for speed


@dataclass(frozen=True)
class Distribution:
    """Cell lengths (already capped at the model's maximum length) and where they came from."""

    name: str
    lengths: np.ndarray
    max_length: int


# ---------------------------------------------------------------------------------------------- length sources
def corpus_lengths(paths: list[Path], max_length: int) -> np.ndarray:
    """Lengths of the training cells (``split`` = train, or all cells without the column) of parquet corpora."""
    import pyarrow.parquet as pq

    files = [f for p in paths for f in (sorted(p.rglob("*.parquet")) if p.is_dir() else [p])]
    lengths = []
    for file in files:
        table = pq.read_table(file, columns=[c for c in ("length", "split") if c in pq.read_schema(file).names])
        keep = np.ones(table.num_rows, bool)
        if "split" in table.column_names:
            keep = np.asarray(table.column("split").to_pylist()) == "train"
        lengths.append(table.column("length").to_numpy()[keep])
    if not lengths:
        msg = f"no parquet files under {[str(p) for p in paths]}"
        raise FileNotFoundError(msg)
    return np.minimum(np.concatenate(lengths), max_length)


def tokenize_demo(directory: Path) -> Path:
    """Tokenize the demo h5ad (V1, 5 % validation) with the ``gfw`` CLI; returns the corpus file."""
    gfw = [sys.executable, "-m", "geneformer_workflow"]
    medians, vocab, corpus = directory / "gene_medians.tsv", directory / "vocab", directory / "corpus.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow" / "scripts")}
    for command in (
        [*gfw, "medians", str(DEMO_H5AD), "-o", str(medians)],
        [*gfw, "vocab", str(medians), "-o", str(vocab), "--preset", "v1"],
        [*gfw, "tokenize", str(DEMO_H5AD), str(corpus), "--token-dictionary", str(vocab),
         "--gene-medians", str(medians), "--preset", "v1", "--validation-fraction", "0.05"],
    ):  # fmt: skip
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return corpus


def synthetic_lengths(n_cells: int, *, median: float, sigma: float, low: int, high: int, seed: int) -> np.ndarray:
    """Seeded log-normal cell lengths clipped to ``[low, high]``."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, size=n_cells), low, high).astype(np.int64)


def distributions(args: argparse.Namespace, workdir: Path) -> list[Distribution]:
    """The corpus distribution, plus the synthetic ones unless ``--no-synthetic``."""
    paths = [Path(p) for p in args.corpus] if args.corpus else []
    if not paths:
        paths = [DEFAULT_CORPUS] if any(DEFAULT_CORPUS.rglob("*.parquet")) else [tokenize_demo(workdir)]
    out = [Distribution(f"corpus ({', '.join(map(str, paths))})", corpus_lengths(paths, 2048), 2048)]
    if not args.no_synthetic:
        out.append(
            Distribution(
                "synthetic long tail: log-normal median 800, sigma 0.8, 64-2,048, 20k cells",
                synthetic_lengths(20_000, median=800, sigma=0.8, low=64, high=2048, seed=0),
                2048,
            )
        )
        out.append(
            Distribution(
                "synthetic heavy tail: log-normal median 300, sigma 1.0, 16-4,096, 20k cells",
                synthetic_lengths(20_000, median=300, sigma=1.0, low=16, high=4096, seed=1),
                4096,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------- batch plans
def random_plan(n_cells: int, micro_batch_size: int, seed: int) -> list[np.ndarray]:
    """One epoch of a plain shuffled loader (last incomplete batch dropped)."""
    order = np.random.default_rng(seed).permutation(n_cells)
    n = n_cells // micro_batch_size * micro_batch_size
    return list(order[:n].reshape(-1, micro_batch_size))


def grouped_plan(lengths: np.ndarray, layout: BatchLayout, window_batches: int, seed: int) -> list[np.ndarray]:
    """One epoch of the engine's micro-batches, every step and rank, in training order."""
    sampler = GlobalBatchSampler(lengths=lengths, layout=layout, seed=seed, window_batches=window_batches)
    return [
        micro
        for step in range(sampler.batches_per_epoch)
        for rank in range(layout.world_size)
        for micro in sampler.micro_batches(step, rank)[1]
    ]


def padded_width(longest: int, multiple: int) -> int:
    """The collator's padded length: the longest cell rounded up to ``multiple``."""
    return -(-longest // multiple) * multiple


def padding_waste(lengths: np.ndarray, plan: list[np.ndarray], multiple: int) -> float:
    """Fraction of token slots that are padding, over all micro-batches of ``plan``."""
    real = sum(int(lengths[m].sum()) for m in plan)
    slots = sum(padded_width(int(lengths[m].max()), multiple) * len(m) for m in plan)
    return 1.0 - real / slots


# ---------------------------------------------------------------------------------------------- speed
def make_batch(cell_lengths: np.ndarray, multiple: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random gene ids right-padded like the collator, 15 % of real tokens masked (``<mask>`` = 1)."""
    width = padded_width(int(cell_lengths.max()), multiple)
    lengths = torch.as_tensor(cell_lengths)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, VOCAB_SIZE, (len(cell_lengths), width), generator=gen) * mask
    chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return torch.where(chosen, torch.ones_like(ids), ids), mask, labels


def train_step_fn(model: torch.nn.Module) -> Callable[..., None]:
    """Forward + backward + AdamW on one batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(ids, mask, labels).loss.backward()
        optimizer.step()

    return step


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (an unbiased sample of an epoch, not its longest-first start)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(k, n))})


def tokens_per_second(
    dist: Distribution, plans: dict[str, list[np.ndarray]], args: argparse.Namespace
) -> dict[str, float]:
    """Non-pad tokens/s over ``--steps`` micro-batches spread over each plan's epoch (after one warm-up each)."""
    cfg = ModelConfig.from_preset(
        args.model,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=dist.max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    step = train_step_fn(GeneformerForMaskedLM(cfg).train())
    gen = torch.Generator().manual_seed(0)
    batches = {name: [make_batch(dist.lengths[plan[i]], args.pad_to_multiple_of, gen)
                      for i in spread(len(plan), args.steps + 1)]
               for name, plan in plans.items()}  # fmt: skip
    seconds = dict.fromkeys(plans, 0.0)
    tokens = dict.fromkeys(plans, 0)
    for i in range(min(len(b) for b in batches.values())):
        for name in plans:  # alternate, so load from other processes hits both plans alike
            ids, mask, labels = batches[name][i]
            started = time.perf_counter()
            step(ids, mask, labels)
            if i > 0:
                seconds[name] += time.perf_counter() - started
                tokens[name] += int(mask.sum())
    return {name: tokens[name] / seconds[name] for name in plans}


# ---------------------------------------------------------------------------------------------- report
def report_distribution(dist: Distribution, args: argparse.Namespace) -> dict:
    """Print and return the padding-waste table (and speeds) of one length distribution."""
    q = np.percentile(dist.lengths, [10, 50, 90])
    print(f"\n## {dist.name}\n{len(dist.lengths):,} training cells, length p10/median/p90 = "
          f"{q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}, {np.mean(dist.lengths == dist.max_length):.0%} at the cap "
          f"{dist.max_length}")  # fmt: skip
    print(f"{'micro-batch':>11} {'ranks':>5} {'window':>6} {'random waste':>13} {'grouped waste':>14}")
    rows = []
    for micro in args.micro_batch_sizes:
        for window in args.windows:
            layout = BatchLayout(micro_batch_size=micro, world_size=args.world_size, grad_accum=1)
            if len(dist.lengths) < layout.global_batch_size:
                continue
            plans = {
                "random": random_plan(len(dist.lengths), micro, args.seed),
                "grouped": grouped_plan(dist.lengths, layout, window, args.seed),
            }
            row = {"micro_batch_size": micro, "world_size": args.world_size, "window_batches": window}
            row |= {f"{k}_waste": padding_waste(dist.lengths, p, args.pad_to_multiple_of) for k, p in plans.items()}
            print(f"{micro:>11} {args.world_size:>5} {window:>6} {row['random_waste']:>13.1%} "
                  f"{row['grouped_waste']:>14.1%}")  # fmt: skip
            rows.append(row)
    result = {"name": dist.name, "n_cells": len(dist.lengths), "waste": rows}
    if args.steps > 0 and len(dist.lengths) >= args.speed_micro_batch_size:
        layout = BatchLayout(micro_batch_size=args.speed_micro_batch_size, world_size=1, grad_accum=1)
        plans = {
            "random": random_plan(len(dist.lengths), args.speed_micro_batch_size, args.seed),
            "grouped": grouped_plan(dist.lengths, layout, args.speed_window, args.seed),
        }
        speed = tokens_per_second(dist, plans, args)
        print(f"non-pad tokens/s, {args.model} model, micro-batch {args.speed_micro_batch_size}, window "
              f"{args.speed_window}, {args.steps} steps each: random {speed['random']:,.0f}, grouped "
              f"{speed['grouped']:,.0f} ({speed['grouped'] / speed['random']:.2f}x)")  # fmt: skip
        result["tokens_per_second"] = speed
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="*", help="tokenized parquet files or directories (default: demo corpus)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic length distributions")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[2, 8, 12], help="for the waste table")
    parser.add_argument("--windows", type=int, nargs="+", default=[50, 200], help="window_batches values")
    parser.add_argument("--world-size", type=int, default=1, help="ranks sharing a global batch (default 1)")
    parser.add_argument("--pad-to-multiple-of", type=int, default=8, help="as data.pad_to_multiple_of (default 8)")
    parser.add_argument("--model", default="sanity", help="model preset timed for tokens/s (default sanity)")
    parser.add_argument("--steps", type=int, default=6, help="timed micro-batches per plan; 0 = no timing")
    parser.add_argument("--speed-micro-batch-size", type=int, default=8, help="micro-batch for timing (default 8)")
    parser.add_argument("--speed-window", type=int, default=200, help="window_batches for timing (default 200)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=42, help="seed of both plans (default 42)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and optionally writes) the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    machine += f", {torch.get_num_threads()} threads"
    print(f"# Batching benchmark ({machine})")
    with tempfile.TemporaryDirectory(prefix="gfw-batching-") as workdir:
        results = {"machine": machine, "distributions": [report_distribution(d, args)
                                                          for d in distributions(args, Path(workdir))]}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
