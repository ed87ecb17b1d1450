"""Impossible combinations are refused at start, naming the key: the config alone (``validate_config``) and the
config against the job (``check_environment``: CUDA devices, ``WORLD_SIZE``, the resumed global batch)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from geneformer_workflow.train import check_environment, compose_config, main, validate_config

REQUIRED = ["run_dir=/tmp/x", "data.corpus=[a.parquet]", "data.vocab_dir=v", "data.max_length=2048"]


def refused(overrides: list[str], message: str, tier: str = "sanity") -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(compose_config(tier, [*REQUIRED, *overrides]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fp8.enabled=true", "model.use_te=true"], "fp8.enabled=true needs CUDA + Transformer Engine (FP8 GEMMs)"),
        (["model.use_te=true"], "model.use_te=true needs CUDA + Transformer Engine, but training.device=cpu"),
        (["backend.name=mfsdp"], "backend.name=mfsdp needs CUDA GPUs"),
        (["training.precision=bf16"], "training.precision=bf16 needs a CUDA device"),
    ],
    ids=["fp8", "te", "mfsdp", "bf16"],
)
def test_gpu_features_with_training_device_cpu_are_refused(overrides, message):
    refused(["training.device=cpu", *overrides], message)


def test_fp8_needs_padding_to_a_multiple_of_16():
    refused(["data.pad_to_multiple_of=8"], "data.pad_to_multiple_of=16", tier="4b_te_fp8")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_attention_heads=3"], "model.hidden_size=64 is not divisible by model.num_attention_heads=3"),
        (["model.hidden_size=0"], "model.hidden_size=0 must be a positive integer"),
        (["model.hidden_dropout_prob=1.0"], "model.hidden_dropout_prob=1.0 must be a number in [0, 1)"),
        (["data.mlm_probability=0"], "data.mlm_probability=0 must be in (0, 1)"),
        (["data.mask_replace_prob=0.8", "data.random_replace_prob=0.3"], "data.mask_replace_prob=0.8"),
        (["backend.name=fsdp3"], "backend.name='fsdp3' is not one of"),
        (["training.device=tpu"], "training.device='tpu' is not one of"),
        (["training.precision=fp16"], "training.precision='fp16' is not one of"),
        (["scheduler.name=step"], "scheduler.name='step' is not one of"),
    ],
    ids=["heads", "hidden", "dropout", "mlm", "replace-sum", "backend", "device", "precision", "scheduler"],
)
def test_impossible_values_are_refused_before_the_data_is_read(overrides, message):
    refused(overrides, message)


@pytest.mark.parametrize("value", ["''", "/"], ids=["empty", "root"])
@pytest.mark.parametrize("key", ["run_dir", "data.cache_dir"])
def test_output_directories_must_be_named(key, value):
    refused([f"{key}={value}"], f"{key}=")


def job(*overrides: str):
    return compose_config("sanity", [*REQUIRED, *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.device=auto", "backend.name=mfsdp"], "backend.name=mfsdp needs CUDA GPUs"),
        (["training.device=auto", "training.precision=bf16"], "training.precision=bf16 needs a CUDA device"),
        (["training.device=cuda"], "training.device=cuda but no CUDA device is visible"),
    ],
    ids=["mfsdp", "bf16", "cuda"],
)
def test_gpu_features_on_a_machine_without_cuda_are_refused(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_environment(job(*overrides), {}, cuda_devices=0)


def test_fp8_tier_without_cuda_names_fp8():
    cfg = compose_config("4b_te_fp8", [*REQUIRED, "training.device=auto"])
    validate_config(cfg)
    with pytest.raises(ValueError, match=re.escape("fp8.enabled=true needs CUDA")):
        check_environment(cfg, {}, cuda_devices=0)


def test_more_processes_per_node_than_gpus_is_refused():
    env = {"WORLD_SIZE": "8", "RANK": "0", "LOCAL_WORLD_SIZE": "8"}
    with pytest.raises(ValueError, match=re.escape("LOCAL_WORLD_SIZE=8 processes on this node but only 4 visible")):
        check_environment(job("training.device=auto"), env, cuda_devices=4)
    check_environment(job("training.device=auto"), {**env, "LOCAL_WORLD_SIZE": "4"}, cuda_devices=4)


def test_backend_none_with_several_processes_is_refused():
    with pytest.raises(ValueError, match=re.escape("backend.name=none cannot train with WORLD_SIZE=2")):
        check_environment(job("backend.name=none"), {"WORLD_SIZE": "2", "RANK": "1"}, cuda_devices=0)


def resumable_run(run_dir: Path, global_batch_size: int) -> None:
    step = run_dir / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / "checkpoint.json").write_text(json.dumps({"step": 4, "global_batch_size": global_batch_size}))


@pytest.mark.parametrize(
    ("world_size", "overrides", "message"),
    [
        (3, [], "global_batch_size=12, which data.micro_batch_size=2 x WORLD_SIZE=3 x training.grad_accum_steps=1 = 6"
                " does not match; set data.micro_batch_size x training.grad_accum_steps = 4, e.g. "
                "data.micro_batch_size=2 training.grad_accum_steps=2"),
        (5, [], "run with a number of processes that divides 12"),
        (4, ["data.micro_batch_size=2", "training.grad_accum_steps=3"], "data.micro_batch_size=1 training."
                                                                         "grad_accum_steps=3"),
    ],
    ids=["keep-micro", "not-divisible", "smaller-micro"],
)  # fmt: skip
def test_resuming_needs_the_same_global_batch_on_any_number_of_ranks(tmp_path, world_size, overrides, message):
    resumable_run(tmp_path, 12)
    cfg = compose_config(
        "sanity", [f"run_dir={tmp_path}", "data.corpus=[a]", "data.vocab_dir=v", "data.max_length=2048", *overrides]
    )
    env = {"WORLD_SIZE": str(world_size), "RANK": "0"}
    with pytest.raises(ValueError, match=re.escape(message)):
        check_environment(cfg, env, cuda_devices=0)


def test_resuming_with_a_matching_batch_or_without_resume_passes(tmp_path):
    resumable_run(tmp_path, 12)
    base = [f"run_dir={tmp_path}", "data.corpus=[a]", "data.vocab_dir=v", "data.max_length=2048"]
    env = {"WORLD_SIZE": "3", "RANK": "0"}
    check_environment(compose_config("sanity", [*base, "training.grad_accum_steps=2"]), env, cuda_devices=0)
    check_environment(compose_config("sanity", [*base, "checkpoint.resume=false"]), env, cuda_devices=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_main_refuses_before_reading_the_corpus(tmp_path):
    """The corpus and vocabulary do not exist: the config error comes first, so it was checked before them."""
    cfg = compose_config(
        "sanity",
        [f"run_dir={tmp_path}", "data.corpus=[missing.parquet]", "data.vocab_dir=missing", "data.max_length=2048",
         "training.device=auto",
         "backend.name=mfsdp"],
    )  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("backend.name=mfsdp needs CUDA GPUs")):
        main(cfg)
    assert not any(tmp_path.iterdir())
