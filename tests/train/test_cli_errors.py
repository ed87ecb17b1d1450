"""``gfw train`` ends an error that names its fix with one line ``gfw train: error: ...`` and exit code 1.

Config errors, checkpoint and cache errors, a NaN loss and missing CUDA / Transformer Engine are such errors;
anything else is a bug or an environment problem and keeps its traceback.
"""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch
from geneformer_workflow import train
from geneformer_workflow.model import te
from geneformer_workflow.train import cli_main, parallel
from geneformer_workflow.train.checkpoint import CheckpointError
from geneformer_workflow.train.corpus import CacheWriteError
from geneformer_workflow.train.distributed import DistributedConfig, Runtime
from geneformer_workflow.train.trainer import NonFiniteLossError

from .conftest import FAST, subprocess_env, train_command


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """One process, and the package logger's level restored (``cli_main`` sets it)."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    logger = logging.getLogger("geneformer_workflow")
    level = logger.level
    yield
    logger.setLevel(level)


def run_cli(capsys, small_corpus, tmp_path, *overrides: str) -> tuple[int, str]:
    argv = ["--config-name", "sanity", *small_corpus.overrides(tmp_path / "run", *FAST, *overrides)]
    code = cli_main(argv)
    return code, capsys.readouterr().err


CONFIG_ERRORS = {
    "value": ("training.max_steps=0", "gfw train: error: training.max_steps=0 must be a positive integer\n"),
    "unknown-key": (
        "training.max_stepz=3",
        "gfw train: error: Could not override 'training.max_stepz'. To append to your config use "
        "+training.max_stepz=3\n",
    ),
    "interpolation": ("data.cache_dir=${nowhere}", "gfw train: error: Interpolation key 'nowhere' not found"),
}


@pytest.mark.parametrize(("override", "expected"), CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_a_config_error_is_one_line_and_exit_code_1(capsys, small_corpus, tmp_path, override, expected):
    code, err = run_cli(capsys, small_corpus, tmp_path, override)
    assert code == 1
    assert err.startswith(expected) and err.count("\n") == 1, err


def _no_cuda_for_te() -> None:
    te.require_te("model.use_te")  # this machine has no CUDA or no Transformer Engine


def _no_cuda_for_fp8() -> None:
    te.require_te("fp8.enabled")


def _no_cuda_for_mfsdp() -> None:
    runtime = Runtime(dist=DistributedConfig(), device=torch.device("cpu"))
    parallel.wrap_model_mfsdp(torch.nn.Linear(2, 2), None, runtime, fully_shard_kwargs={})


def _raise(error: Exception):
    def fail() -> None:
        raise error

    return fail


RUN_ERRORS = {
    "checkpoint": (
        _raise(CheckpointError("cannot write checkpoint run/checkpoints/step_3: no space left on device")),
        "CheckpointError: cannot write checkpoint run/checkpoints/step_3: no space left on device",
    ),
    "nan-loss": (
        _raise(NonFiniteLossError("the training loss became nan between steps 3 and 4")),
        "NonFiniteLossError: the training loss became nan between steps 3 and 4",
    ),
    "cache": (
        _raise(CacheWriteError("cannot write the token cache in c (data.cache_dir): disk full")),
        "CacheWriteError: cannot write the token cache in c (data.cache_dir): disk full",
    ),
    "te": (_no_cuda_for_te, "model.use_te=true needs CUDA + Transformer Engine"),
    "fp8": (_no_cuda_for_fp8, "fp8.enabled=true needs CUDA + Transformer Engine"),
    "mfsdp": (_no_cuda_for_mfsdp, "backend.name=mfsdp needs CUDA GPUs"),
}


@pytest.mark.parametrize(("fail", "expected"), RUN_ERRORS.values(), ids=RUN_ERRORS.keys())
def test_an_error_that_names_its_fix_is_one_line(capsys, small_corpus, tmp_path, monkeypatch, fail, expected):
    if torch.cuda.is_available():
        pytest.skip("the CUDA checks pass on a machine with CUDA")
    monkeypatch.setattr(train, "main", lambda cfg: fail())
    code, err = run_cli(capsys, small_corpus, tmp_path)
    assert code == 1
    assert err.startswith(f"gfw train: error: {expected}") and err.count("\n") == 1, err


def test_every_rank_prefixes_its_line_with_its_rank(capsys, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_cli(capsys, small_corpus, tmp_path, "training.max_steps=0")
    assert (code, err) == (1, "[rank1]: gfw train: error: training.max_steps=0 must be a positive integer\n")


UNEXPECTED = {
    "torch-runtime-error": lambda: torch.zeros(2) @ torch.zeros(3),  # a RuntimeError from torch, not from a check
    "key-error": _raise(KeyError("step")),
    "runtime-error-elsewhere": _raise(RuntimeError("needs CUDA + Transformer Engine")),  # same words, other origin
}


@pytest.mark.parametrize("fail", UNEXPECTED.values(), ids=UNEXPECTED.keys())
def test_an_unexpected_error_keeps_its_traceback(small_corpus, tmp_path, monkeypatch, fail):
    monkeypatch.setattr(train, "main", lambda cfg: fail())
    with pytest.raises((RuntimeError, KeyError)):
        cli_main(["--config-name", "sanity", *small_corpus.overrides(tmp_path, *FAST)])


def test_the_command_prints_no_traceback_for_a_config_error(small_corpus, tmp_path):
    overrides = small_corpus.overrides(tmp_path, *FAST, "data.micro_batch_size=-2")
    proc = subprocess.run(
        train_command(1, overrides), env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "gfw train: error: data.micro_batch_size=-2 must be a positive integer"
    assert "Traceback" not in proc.stderr
