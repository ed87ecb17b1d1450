"""Faults during tokenization: kill -9 and a full disk leave no output that looks complete, and a
re-run produces byte-identical files."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from geneformer_workflow.presets import PRESETS
from geneformer_workflow.testing import synthetic_counts, write_counts_h5ad
from geneformer_workflow.tokenize.vocab import build_token_dictionary, write_vocab_dir

SUFFIXES = (".parquet", ".lengths.npy", ".lengths.pkl", ".manifest.json")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    genes = [f"ENSG{i:011d}" for i in range(400)]
    h5ad = write_counts_h5ad(
        root / "in.h5ad", synthetic_counts(6000, 400, genes_per_cell=150, seed=5).toarray(), genes
    )
    medians = root / "gene_medians.tsv"
    medians.write_text("ensembl_id\tmedian\n" + "".join(f"{g}\t{1 + i % 7}\n" for i, g in enumerate(genes)))
    vocab = write_vocab_dir(build_token_dictionary(genes, PRESETS["v1"]), root / "vocab", max_length=2048)
    return h5ad, medians, vocab


def command(inputs, out: Path) -> list[str]:
    h5ad, medians, vocab = inputs
    return [
        sys.executable,
        "-m",
        "geneformer_workflow",
        "tokenize",
        str(h5ad),
        str(out),
        "--token-dictionary",
        str(vocab),
        "--gene-medians",
        str(medians),
        "--chunk-size",
        "16",
    ]


def outputs(out: Path) -> dict[str, bytes]:
    stem = out.with_suffix("")
    return {s: Path(f"{stem}{s}").read_bytes() for s in SUFFIXES if Path(f"{stem}{s}").exists()}


@pytest.fixture(scope="module")
def clean_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "corpus.parquet"
    subprocess.run(command(inputs, out), check=True, capture_output=True, timeout=300)
    return outputs(out)


def test_kill_9_mid_run_leaves_nothing_complete_and_rerun_is_byte_identical(inputs, clean_run, tmp_path):
    out = tmp_path / "corpus.parquet"
    proc = subprocess.Popen(command(inputs, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".corpus.parquet.*.tmp/*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert outputs(out) == {}
    subprocess.run(command(inputs, out), check=True, capture_output=True, timeout=300)
    assert outputs(out) == clean_run
    assert not list(tmp_path.glob(".*.tmp")), "the re-run left temporaries behind"


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_full_disk_fails_clearly_without_output_and_rerun_is_byte_identical(inputs, clean_run, tmp_path):
    out = tmp_path / "corpus.parquet"
    result = subprocess.run(
        command(inputs, out),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "gfw tokenize: error:" in result.stderr and "File too large" in result.stderr
    assert outputs(out) == {}
    assert not list(tmp_path.glob(".*.tmp"))
    subprocess.run(command(inputs, out), check=True, capture_output=True, timeout=300)
    assert outputs(out) == clean_run


def test_a_disk_that_fills_up_is_named_and_leaves_no_output(inputs, tmp_path):
    """The corpus shard fills a small disk: the message says so (not numpy's bare "N requested and M written")."""
    from ..train.conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "corpus.parquet"
        result = subprocess.run(command(inputs, out), capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("gfw tokenize: error:") and "full" in line, line
        assert list(disk.iterdir()) == []  # no output, no temporary


def test_a_short_write_without_errno_is_named_a_full_disk(tmp_path):
    from geneformer_workflow.atomic import describe_os_error

    message = describe_os_error(OSError("50000 requested and 16352 written"), tmp_path / "x.npy")
    assert "disk is probably full" in message and "50000 requested" in message
    assert describe_os_error(FileNotFoundError(2, "No such file or directory"), tmp_path) == (
        "[Errno 2] No such file or directory"
    )
