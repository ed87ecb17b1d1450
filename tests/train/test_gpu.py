"""Training on one CUDA GPU (``pytest -m gpu``; skipped without CUDA). Run by benchmarks/gpu_check.py."""

from __future__ import annotations

import pytest
import torch
from geneformer_workflow.train import main

from .conftest import compose, read_metrics, train_losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="requires_gpu: needs a CUDA device"),
]
CUDA_STEPS = ("training.device=cuda", "training.max_steps=6", "checkpoint.save_every=6")


def test_bf16_training_tracks_fp32_and_logs_gpu_metrics(small_corpus, tmp_path):
    main(compose(small_corpus, tmp_path / "fp32", *CUDA_STEPS, "training.precision=fp32"))
    main(compose(small_corpus, tmp_path / "bf16", *CUDA_STEPS, "training.precision=bf16"))
    fp32, bf16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert sorted(bf16) == list(range(1, 7))
    assert bf16 == pytest.approx(fp32, abs=0.05, rel=0)
    last = [r for r in read_metrics(tmp_path / "bf16") if "train/loss" in r][-1]
    assert last["train/gpu_memory_allocated_max_gb"] > 0
    assert last["train/tflops_per_second_per_rank"] > 0
    name = torch.cuda.get_device_name()
    if any(gpu in name for gpu in ("H100", "H200", "A100")):
        assert 0 < last["train/mfu"] < 100


def test_activation_checkpointing_gives_the_same_losses_on_cuda(small_corpus, tmp_path):
    common = (*CUDA_STEPS, "training.precision=fp32")
    main(compose(small_corpus, tmp_path / "plain", *common))
    main(compose(small_corpus, tmp_path / "ckpt", *common, "model.gradient_checkpointing=true"))
    assert train_losses(tmp_path / "ckpt") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-5, rel=0)
