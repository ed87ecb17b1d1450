"""Fixtures for the training tests: a synthetic vocabulary, corpora and helpers that run training.

Two synthetic corpora, both seeded: ``small_corpus`` (short cells, for fast multi-run tests) and
``sanity_corpus`` (200 training + 24 validation cells of ~1,500 tokens, like a real V1 corpus).
Cells are rank-value encodings: distinct gene tokens per cell, no special tokens (V1 style).
``demo_corpus`` is the real one: the 200 PBMC cells of ``resources/demo`` tokenized by ``gfw``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from geneformer_workflow.presets import get_preset
from geneformer_workflow.tokenize.vocab import TOKENIZER_CONFIG, hf_tokenizer_files
from geneformer_workflow.train import compose_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "workflow" / "scripts"
DEMO_H5AD = REPO / "resources" / "demo" / "pbmc_5k_protein_v3.h5ad"
N_GENES = 3_000


def write_vocab(directory: Path, *, n_genes: int = N_GENES, v2: bool = False) -> Path:
    """A token dictionary ``<pad>``, ``<mask>`` (+ ``<cls>``, ``<eos>``) then ``n_genes`` Ensembl-like ids, and the
    tokenizer config with the preset's ``model_max_length``."""
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if v2 else [])
    names = specials + [f"ENSG{i:011d}" for i in range(n_genes)]
    tokens = {name: i for i, name in enumerate(names)}
    (directory / "token_dictionary.json").write_text(json.dumps(tokens))
    (directory / "vocab.txt").write_text("\n".join(names) + "\n")
    # model_max_length as `gfw vocab` records it: data.max_length: null reads it
    config = hf_tokenizer_files(tokens, max_length=get_preset("v2" if v2 else "v1").max_length)[TOKENIZER_CONFIG]
    (directory / TOKENIZER_CONFIG).write_text(config)
    return directory


def make_cells(
    rng: np.random.Generator, lengths: np.ndarray, cell_types: np.ndarray, *, first_gene: int, n_genes: int
) -> list[np.ndarray]:
    """Rank-value encodings with learnable structure: distinct genes, ordered by a noisy expression score.

    Score = log base expression (shared) + a cell-type effect + Gumbel noise; each cell keeps its
    top ``length`` genes in descending score order, so frequent genes come first, as in real data.
    """
    base = rng.normal(0.0, 1.5, size=n_genes)
    effects = {t: rng.normal(0.0, 1.0, size=n_genes) for t in np.unique(cell_types)}
    genes = np.arange(first_gene, first_gene + n_genes, dtype=np.int32)
    cells = []
    for n, cell_type in zip(lengths, cell_types, strict=True):
        score = base + effects[cell_type] + rng.gumbel(size=n_genes)
        top = np.argpartition(-score, int(n) - 1)[: int(n)]
        cells.append(genes[top[np.argsort(-score[top])]])
    return cells


def write_corpus(
    directory: Path, lengths: np.ndarray, *, seed: int, n_files: int = 2, n_validation: int
) -> list[Path]:
    """Write cells as ``n_files`` parquet files with the tokenizer's columns plus an extra obs column."""
    rng = np.random.default_rng(seed)
    cell_types = rng.choice(np.array(["T", "B", "NK"]), len(lengths))
    cells = make_cells(rng, lengths, cell_types, first_gene=2, n_genes=N_GENES)
    split = np.array(["train"] * len(cells), dtype=object)
    split[rng.choice(len(cells), n_validation, replace=False)] = "validation"
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(len(cells)), n_files)):
        table = pa.table(
            {
                "input_ids": pa.array([cells[i] for i in rows], type=pa.list_(pa.int32())),
                "length": pa.array([len(cells[i]) for i in rows], type=pa.int32()),
                "cell_id": pa.array([f"cell{i}" for i in rows]),
                "split": pa.array(split[rows].tolist()),
                "cell_type": pa.array(cell_types[rows].tolist()),
            }
        )
        path = directory / f"part-{k}.parquet"
        pq.write_table(table, path, row_group_size=32)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Corpus:
    """A synthetic corpus and its vocabulary."""

    files: list[Path]
    vocab_dir: Path

    @property
    def corpus_override(self) -> str:
        return "data.corpus=[" + ",".join(str(p) for p in self.files) + "]"

    def overrides(self, run_dir: Path, *extra: str) -> list[str]:
        """Hydra overrides pointing the sanity config at this corpus and ``run_dir``."""
        return [self.corpus_override, f"data.vocab_dir={self.vocab_dir}", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """In-process training on 1 thread, like the subprocesses (OMP_NUM_THREADS=1).

    Same thread count means the same float reduction order, and on a busy 2-core machine two
    OpenMP threads per process are several times slower than one.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> Corpus:
    """120 cells of 16–256 tokens (log-normal, like a down-scaled real corpus), 24 of them validation."""
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(90), 0.6, size=120), 16, 256).astype(int)
    files = write_corpus(tmp_path_factory.mktemp("small_corpus"), lengths, seed=2, n_validation=24)
    return Corpus(files=files, vocab_dir=vocab_dir)


@pytest.fixture(scope="session")
def sanity_corpus(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> Corpus:
    """224 cells of ~1,500 tokens (normal, sd 350, clipped to 300–2,048), 24 of them validation."""
    rng = np.random.default_rng(3)
    lengths = np.clip(rng.normal(1500, 350, size=224), 300, 2048).astype(int)
    files = write_corpus(tmp_path_factory.mktemp("sanity_corpus"), lengths, seed=4, n_validation=24)
    return Corpus(files=files, vocab_dir=vocab_dir)


def tokenize_demo(directory: Path) -> Corpus:
    """Tokenize the demo h5ad like the workflow does (V1 preset, 5 % validation cells), with the ``gfw`` CLI.

    The workflow's QC step is skipped: it keeps all 200 demo cells anyway. About 6 s.
    """
    gfw = [sys.executable, "-m", "geneformer_workflow"]
    medians, vocab, corpus = directory / "gene_medians.tsv", directory / "vocab", directory / "corpus.parquet"
    commands = [
        [*gfw, "medians", str(DEMO_H5AD), "-o", str(medians)],
        [*gfw, "vocab", str(medians), "-o", str(vocab), "--preset", "v1"],
        [*gfw, "tokenize", str(DEMO_H5AD), str(corpus), "--token-dictionary", str(vocab),
         "--gene-medians", str(medians), "--preset", "v1", "--validation-fraction", "0.05"],
    ]  # fmt: skip
    for command in commands:
        proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return Corpus(files=[corpus], vocab_dir=vocab)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The 200 real PBMC cells of resources/demo (185 training, 15 validation; median 1,679 tokens)."""
    return tokenize_demo(tmp_path_factory.mktemp("demo_corpus"))


# Fast settings for tests on the small corpus: short cells, tiny batches, frequent logs.
FAST = (
    "data.max_length=256",
    "data.micro_batch_size=2",
    "data.max_validation_cells=16",
    "data.window_batches=4",
    "logging.log_every=1",
    "logging.eval_every=0",
    "logging.console=false",
    "scheduler.warmup_steps=2",
    "wandb.mode=disabled",
)


def compose(corpus: Corpus, run_dir: Path, *extra: str):
    """The sanity config on ``corpus`` with FAST settings and ``extra`` overrides."""
    return compose_config("sanity", corpus.overrides(run_dir, *FAST, *extra))


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """``{step: train/loss}`` from the metrics file."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def subprocess_env() -> dict[str, str]:
    """Environment of training subprocesses: package on the path, 1 thread each, no wandb."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return env


def train_command(nproc: int, overrides: list[str]) -> list[str]:
    """``gfw train`` as a subprocess: plain python for 1 process, torch.distributed.run for more."""
    if nproc == 1:
        return [sys.executable, "-m", "geneformer_workflow", "train", "--config-name", "sanity", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "geneformer_workflow", "train", "--config-name", "sanity", *overrides]


def run_training(nproc: int, overrides: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run training to completion; on failure the assertion shows the output."""
    proc = subprocess.run(
        train_command(nproc, overrides), env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


# Settings shared by the single- and multi-process runs that must give the same losses.
EQUIVALENCE = ("training.max_steps=12", "data.micro_batch_size=2", "checkpoint.save_every=4")


@pytest.fixture(scope="session")
def fsdp2_run(small_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-process FSDP2 run (global batch 4 = 2 cells x 2 ranks x 1 step) on the small corpus."""
    run_dir = tmp_path_factory.mktemp("fsdp2_run")
    run_training(2, small_corpus.overrides(run_dir, *FAST, *EQUIVALENCE, "backend.name=fsdp2"))
    return run_dir


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``"32m"``) at ``mountpoint``, unmounted afterwards; skips the test where mounting
    is not allowed (needs root and CAP_SYS_ADMIN: unprivileged containers)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
