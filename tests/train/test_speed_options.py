"""``model.fused_qkv``, ``model.compile`` and ``model.packed_attention`` in training: checked config, the same
losses as the plain model (one process, and two-process FSDP2 with compiled layers), HF-named exports and
``model.init_from`` across layouts."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from geneformer_workflow.model import split_fused_qkv
from geneformer_workflow.train import main
from geneformer_workflow.train.config import validate_config
from geneformer_workflow.train.export import export_checkpoint, load_checkpoint_model
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from .conftest import EQUIVALENCE, FAST, compose, run_training, train_losses

NO_DROPOUT = ("model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0")
# aot_eager traces the layers as inductor does but generates no code: the same graphs, seconds instead of minutes
COMPILED = ("model.compile=true", "model.compile_backend=aot_eager")
FROZEN = ("optimizer.lr=0.0", "optimizer.weight_decay=0.0", "training.max_steps=1")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.fused_qkv=true", "model.use_te=true", "training.device=cuda"],
         r"model.fused_qkv=true applies to the PyTorch layers only.*set model.fused_qkv=false or model.use_te=false"),
        (["model.compile=true", "model.use_te=true", "training.device=cuda"],
         r"model.compile=true applies to the PyTorch layers only"),
        (["model.compile=true", "backend.name=mfsdp", "training.device=cuda"],
         r"model.compile=true is not supported with backend.name=mfsdp; use one of none, ddp, fsdp2, auto"),
        (["model.compile=true", "model.compile_backend=inductr"],
         r"model.compile_backend='inductr' is not a torch.compile backend; choose one of .*inductor"),
        (["model.fused_qkv=yes"], r"model.fused_qkv='yes' must be true or false"),
        (["model.packed_attention=flash"], r"model.packed_attention='flash' is not one of auto, per_cell, jagged"),
        (["model.packed_attention=jagged", "model.use_te=true", "training.device=cuda"],
         r"model.packed_attention=jagged applies to the PyTorch layers only.*set model.packed_attention=auto"),
    ],
)  # fmt: skip
def test_bad_speed_options_are_refused_naming_the_key(small_corpus, tmp_path, overrides, message):
    cfg = compose(small_corpus, tmp_path, "training.max_steps=1", *overrides)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def test_speed_options_are_off_by_default(small_corpus, tmp_path):
    cfg = compose(small_corpus, tmp_path, "training.max_steps=1")
    assert (cfg.model.fused_qkv, cfg.model.compile, cfg.model.compile_backend) == (False, False, "inductor")
    assert cfg.model.packed_attention == "auto"


@pytest.fixture(scope="module")
def plain_losses(small_corpus, tmp_path_factory) -> dict[int, float]:
    """The plain model: three projections, eager, one process (global batch 4 = 2 cells x 2 accumulation steps)."""
    run_dir = tmp_path_factory.mktemp("plain")
    main(compose(small_corpus, run_dir, *EQUIVALENCE, *NO_DROPOUT, "training.grad_accum_steps=2"))
    return train_losses(run_dir)


def test_fused_compiled_checkpointed_packed_run_has_the_plain_losses(small_corpus, tmp_path, plain_losses):
    torch._dynamo.reset()
    counters.clear()
    main(compose(small_corpus, tmp_path, *EQUIVALENCE, *NO_DROPOUT, *COMPILED, "training.grad_accum_steps=2",
                 "model.fused_qkv=true", "model.gradient_checkpointing=true", "data.packing=true"))  # fmt: skip
    assert 0 < counters["stats"]["unique_graphs"] <= 16  # the layers were compiled, a bounded number of graphs
    torch._dynamo.reset()
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 13))
    assert losses == pytest.approx(plain_losses, abs=1e-5, rel=0)


def test_a_packed_run_with_the_jagged_kernel_has_the_plain_losses(small_corpus, tmp_path, plain_losses):
    """The setting reaches every layer (on CPU the jagged kernel is the per-cell path: tests/model)."""
    main(compose(small_corpus, tmp_path, *EQUIVALENCE, *NO_DROPOUT, "training.grad_accum_steps=2",
                 "model.packed_attention=jagged", "data.packing=true"))  # fmt: skip
    assert train_losses(tmp_path) == pytest.approx(plain_losses, abs=1e-5, rel=0)


@pytest.mark.slow
def test_two_process_fsdp2_with_compiled_fused_layers_has_the_plain_losses(small_corpus, tmp_path, plain_losses):
    # torchtitan's order: layers compiled in place, then fully_shard per layer and at the root (train/parallel.py)
    overrides = [*FAST, *EQUIVALENCE, *NO_DROPOUT, *COMPILED, "model.fused_qkv=true", "backend.name=fsdp2"]
    run_training(2, small_corpus.overrides(tmp_path, *overrides), timeout=240)
    assert train_losses(tmp_path) == pytest.approx(plain_losses, abs=1e-5, rel=0)


@pytest.fixture(scope="module")
def fused_run(small_corpus, tmp_path_factory):
    """A 2-step run of the fused layout and its Hugging Face export."""
    run_dir = tmp_path_factory.mktemp("fused")
    main(compose(small_corpus, run_dir, "training.max_steps=2", "model.fused_qkv=true"))
    return run_dir, export_checkpoint(run_dir, tmp_path_factory.mktemp("export") / "model")


def test_a_fused_run_checkpoints_qkv_and_exports_query_key_value(fused_run):
    run_dir, hf_dir = fused_run
    model, _ = load_checkpoint_model(run_dir)
    assert model.config.fused_qkv
    state = model.state_dict()
    assert "bert.encoder.layer.0.attention.self.qkv.weight" in state
    exported = load_file(hf_dir / "model.safetensors")
    assert "bert.encoder.layer.0.attention.self.qkv.weight" not in exported
    split = split_fused_qkv(state)
    for key, tensor in exported.items():
        assert torch.equal(tensor, split[key]), key


@pytest.mark.parametrize(("source", "fused"), [("ours", False), ("hf", True)])
def test_init_from_converts_between_the_layouts(small_corpus, fused_run, tmp_path, source, fused):
    run_dir, hf_dir = fused_run
    path = run_dir if source == "ours" else hf_dir
    main(compose(small_corpus, tmp_path, *FROZEN, f"model.fused_qkv={str(fused).lower()}", f"model.init_from={path}"))
    started = split_fused_qkv(load_checkpoint_model(tmp_path)[0].state_dict())
    expected = split_fused_qkv(load_checkpoint_model(run_dir)[0].state_dict())
    assert started.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(started[key], tensor, rtol=0, atol=0, msg=key)


def test_resuming_in_the_other_layout_is_refused_naming_the_key(small_corpus, fused_run, tmp_path):
    run_dir = shutil.copytree(fused_run[0], tmp_path / "run")
    with pytest.raises(ValueError, match=r"fused_qkv=true layout but this run has model.fused_qkv=false; keep"):
        main(compose(small_corpus, run_dir, "training.max_steps=3", "model.fused_qkv=false"))
