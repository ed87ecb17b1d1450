"""``model.compile`` (inductor) and ``model.fused_qkv`` on one CUDA GPU (``pytest -m gpu``; skipped without CUDA).

Run by benchmarks/gpu_check.py's ``tests`` section; the CPU tests (tests/model/test_compile.py,
tests/model/test_fused_qkv.py, tests/train/test_speed_options.py) check the same paths with exact or aot_eager
comparisons.
"""

from __future__ import annotations

import pytest
import torch
from geneformer_workflow.train import main

from .conftest import compose, train_losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="requires_gpu: needs a CUDA device"),
]
CUDA_STEPS = ("training.device=cuda", "training.max_steps=6", "checkpoint.save_every=6")
LEVERS = ("model.compile=true", "model.compile_backend=inductor", "model.fused_qkv=true")
NO_DROPOUT = ("model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0")


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_inductor_compiled_fused_layers_track_the_plain_model_in_fp32(small_corpus, tmp_path, packing):
    common = (*CUDA_STEPS, *NO_DROPOUT, "training.precision=fp32", f"data.packing={str(packing).lower()}")
    main(compose(small_corpus, tmp_path / "plain", *common))
    main(compose(small_corpus, tmp_path / "levers", *common, *LEVERS))
    plain, levers = train_losses(tmp_path / "plain"), train_losses(tmp_path / "levers")
    assert sorted(levers) == list(range(1, 7))
    # inductor fuses and reorders float operations (no dropout here: inductor draws its masks its own way)
    assert levers == pytest.approx(plain, abs=1e-3, rel=0)


def test_checkpointing_recomputes_the_same_dropout_masks_in_compiled_layers(small_corpus, tmp_path):
    # with dropout on, a recomputation that drew other masks than the forward would give other gradients
    common = (*CUDA_STEPS, *LEVERS, "training.precision=fp32")
    main(compose(small_corpus, tmp_path / "stored", *common))
    main(compose(small_corpus, tmp_path / "recomputed", *common, "model.gradient_checkpointing=true"))
    recomputed, stored = train_losses(tmp_path / "recomputed"), train_losses(tmp_path / "stored")
    assert recomputed == pytest.approx(stored, abs=1e-4, rel=0)


def test_inductor_compiled_fused_layers_train_in_bf16_with_checkpointing(small_corpus, tmp_path):
    common = (*CUDA_STEPS, "training.precision=bf16")
    main(compose(small_corpus, tmp_path / "plain", *common))
    main(compose(small_corpus, tmp_path / "levers", *common, *LEVERS, "model.gradient_checkpointing=true"))
    assert train_losses(tmp_path / "levers") == pytest.approx(train_losses(tmp_path / "plain"), abs=0.05, rel=0)
