"""Checkpoints of Transformer Engine models: exact FP8 resume and the same weight decay on every backend.

TE and megatron-fsdp need CUDA, so the model is built from ``tests/model/fake_te.py`` (TE 2.20's extra-state, device
and delayed-scaling behaviour, with an emulated FP8 GEMM) and megatron-fsdp is the stand-in below, which follows
megatron-fsdp 0.6.1's ``fully_shard.py`` where our code depends on it. Checkpoints are real DCP checkpoints, written
and read by ``save_checkpoint`` / ``load_checkpoint``; ddp and fsdp2 run in two real gloo processes.
"""

from __future__ import annotations

import functools
import os
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from geneformer_workflow.model import GeneformerForMaskedLM, te_primitives
from geneformer_workflow.train.checkpoint import AppState, TrainState, load_checkpoint, save_checkpoint
from geneformer_workflow.train.distributed import DistributedConfig, Runtime
from geneformer_workflow.train.fp8_state import Fp8ScalingState, delayed_scaling_tensors
from geneformer_workflow.train.optim import build_optimizer
from geneformer_workflow.train.parallel import shard_with_megatron_fsdp, unwrap, wrap_model_ddp, wrap_model_fsdp2
from torch import nn

from ..model import fake_te as fake
from ..model.conftest import tiny_config

CFG = tiny_config()
RECIPE = fake.DelayedScaling(amax_history_len=4)
OPTIMIZER = {"lr": 1e-2, "weight_decay": 0.1, "adamw_kwargs": {}}
SAVE_AT, END = 3, 6


# ----------------------------------------------------------------------------------------------- megatron-fsdp
class FakeMegatronFSDP(nn.Module):
    """``MegatronFSDP``: the user model as ``.module``; every ``*_extra_state`` key is dropped from its state dict
    by the hook that ``fully_shard_model`` registers (``fully_shard.py`` ~l.428-447)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self._register_state_dict_hook(_remove_te_extra_state)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _replace_param_with_distributed_if_needed(self) -> None:
        """Real: DTensor shards with the parameters' global shapes; one process keeps the parameters as they are."""


def _remove_te_extra_state(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.endswith("_extra_state")]:
        state_dict.pop(key)


def _fully_shard_optimizer(optimizer, preproc_state_dict_for_dcp_ckpt: bool = True):
    """``fully_shard_optimizer`` (~l.482-513): its state is initialised by one step on zero gradients."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _fully_shard(module, optimizer, **kwargs):
    """The one-call ``fully_shard`` (~l.745-756): the optimizer's groups are replaced by one with every parameter."""
    model = FakeMegatronFSDP(module)
    model._replace_param_with_distributed_if_needed()
    optimizer.param_groups.clear()
    optimizer.state.clear()
    optimizer.add_param_group({"params": model.parameters()})
    return model, _fully_shard_optimizer(optimizer)


FAKE_MEGATRON_FSDP = types.SimpleNamespace(
    fully_shard_model=lambda module, **kwargs: FakeMegatronFSDP(module),
    fully_shard_optimizer=_fully_shard_optimizer,
    fully_shard=_fully_shard,
)


# ----------------------------------------------------------------------------------------------- training
def _model(seed: int) -> GeneformerForMaskedLM:
    torch.manual_seed(seed)
    return GeneformerForMaskedLM(CFG, te_primitives(te_module=fake.fake_te()))


def _wrap(model: nn.Module, backend: str, runtime: Runtime) -> tuple[nn.Module, torch.optim.Optimizer]:
    if backend == "mfsdp":
        return shard_with_megatron_fsdp(FAKE_MEGATRON_FSDP, model, functools.partial(build_optimizer, **OPTIMIZER))
    if backend == "ddp":
        model = wrap_model_ddp(model, runtime)
    elif backend == "fsdp2":
        model = wrap_model_fsdp2(model, runtime, compute_dtype=torch.float32, fully_shard_kwargs={})
    return model, build_optimizer(model, **OPTIMIZER)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four right-padded cells with about a third of their tokens masked, the same for a (step, rank)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(3, 13, (4,), generator=gen)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = torch.randint(2, CFG.vocab_size, (4, 12), generator=gen) * mask
    chosen = (torch.rand(ids.shape, generator=gen) < 0.35) & mask.bool()
    chosen[:, 0] = True
    return ids.masked_fill(chosen, 1), mask, torch.where(chosen, ids, torch.full_like(ids, -100))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int) -> None:
    group = dist.group.WORLD if dist.is_initialized() else None
    model.train()
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        ids, mask, labels = _batch(step, rank)
        with fake.autocast(recipe=RECIPE, amax_reduction_group=group):
            loss = model(ids, mask, labels).loss
        loss.backward()
        optimizer.step()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    state = unwrap(model).state_dict()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    return {k: v.detach().clone() for k, v in full.items() if not k.endswith("_extra_state")}


def _fp8(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in delayed_scaling_tensors(model).items()}


def _app(model, optimizer, backend: str, *, restore_fp8: bool = True) -> AppState:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    fp8 = Fp8ScalingState(model, RECIPE) if restore_fp8 else None
    return AppState(model, optimizer, scheduler, TrainState(), backend=backend, fp8=fp8)


def stop_and_resume(backend: str, runtime: Runtime, run_dir: Path, *, restore_fp8: bool = True) -> dict:
    """Train to END; and train to SAVE_AT, checkpoint, rebuild from another seed, resume to END. Both results."""
    rank = runtime.dist.rank
    model, optimizer = _wrap(_model(0), backend, runtime)
    app = _app(model, optimizer, backend)
    _train(model, optimizer, range(SAVE_AT), rank)
    app.state.step = SAVE_AT
    saved_fp8 = _fp8(model)
    path = save_checkpoint(run_dir, app, runtime, meta={}, model_config={}, keep_last=0)
    _train(model, optimizer, range(SAVE_AT, END), rank)
    uninterrupted = {"weights": _weights(model), "fp8": _fp8(model)}

    model, optimizer = _wrap(_model(1), backend, runtime)
    app = _app(model, optimizer, backend, restore_fp8=restore_fp8)
    load_checkpoint(path, app)
    loaded_fp8 = _fp8(model)
    _train(model, optimizer, range(SAVE_AT, END), rank)
    resumed = {"weights": _weights(model), "fp8": _fp8(model)}
    return {
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "saved_fp8": saved_fp8,
        "loaded_fp8": loaded_fp8,
        "step": app.state.step,
        "weight_decay": weight_decay_by_name(backend, runtime),
    }


def weight_decay_by_name(backend: str, runtime: Runtime) -> dict[str, float]:
    """Each parameter's weight decay in the optimizer that the backend ends up with, by unwrapped name."""
    model, optimizer = _wrap(_model(0), backend, runtime)
    names = {id(p): name.removeprefix("module.") for name, p in model.named_parameters()}
    return {names[id(p)]: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        runtime = Runtime(
            dist=DistributedConfig(rank=rank, local_rank=rank, world_size=world_size),
            device=torch.device("cpu"),
            backend="gloo",
        )
        result = stop_and_resume(backend, runtime, Path(out_dir) / "run")
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_two_ranks(backend: str, tmp_path: Path) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, _free_port(), backend, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


ONE_PROCESS = Runtime(dist=DistributedConfig(), device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- tests
def _fresh(key: str, value: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(value) if key.endswith(".scale") else torch.zeros_like(value)


def _check_exact_resume(result: dict) -> None:
    assert result["step"] == SAVE_AT
    assert result["saved_fp8"], "no FP8 state was trained: the test would prove nothing"
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in result["saved_fp8"].items() if k.endswith("scale"))
    # Restored: every module whose state moved away from a fresh one (the attention's state stays fresh: no FP8 GEMMs)
    saved, loaded = result["saved_fp8"], result["loaded_fp8"]
    moved = {k.rsplit(".", 2)[0] for k, v in saved.items() if not torch.equal(v, _fresh(k, v))}
    assert moved and {k for k in saved if k.rsplit(".", 2)[0] in moved} <= loaded.keys()
    _assert_same(loaded, {k: saved[k] for k in loaded})
    _assert_same(result["resumed"]["fp8"], result["uninterrupted"]["fp8"])
    _assert_same(result["resumed"]["weights"], result["uninterrupted"]["weights"])


@pytest.mark.parametrize("backend", ["none", "mfsdp"])
def test_fp8_te_model_resumes_exactly_in_one_process(backend, tmp_path):
    _check_exact_resume(stop_and_resume(backend, ONE_PROCESS, tmp_path))


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_fp8_te_model_resumes_exactly_on_two_ranks(backend, tmp_path):
    for result in _run_two_ranks(backend, tmp_path):
        _check_exact_resume(result)


def test_checkpoints_hold_fp8_state_as_plain_tensors_and_no_extra_state(tmp_path):
    import torch.distributed.checkpoint as dcp

    stop_and_resume("none", ONE_PROCESS, tmp_path)
    keys = dcp.FileSystemReader(str(tmp_path / "checkpoints" / f"step_{SAVE_AT}")).read_metadata().state_dict_metadata
    assert not [key for key in keys if key.endswith("_extra_state")]
    fp8 = [key for key in keys if key.startswith("app.fp8.")]
    assert "app.fp8.bert.encoder.layer.0.attention.self.query.scaling_fwd.amax_history" in fp8
    assert all(type(keys[key]).__name__ == "TensorStorageMetadata" for key in fp8)


def test_without_the_fp8_state_a_resume_diverges(tmp_path):
    """The control: the emulated FP8 state matters, so the exact resumes above do test its restoring."""
    result = stop_and_resume("none", ONE_PROCESS, tmp_path, restore_fp8=False)
    weights = result["resumed"]["weights"]
    assert any(not torch.equal(weights[k], result["uninterrupted"]["weights"][k]) for k in weights)


def test_weight_decay_of_every_parameter_is_the_same_on_every_backend(tmp_path):
    reference = weight_decay_by_name("none", ONE_PROCESS)
    assert reference["bert.encoder.layer.0.attention.self.query.bias"] == 0.0
    assert reference["bert.encoder.layer.0.attention.output.LayerNorm.weight"] == 0.0
    assert reference["bert.encoder.layer.0.attention.self.query.weight"] == OPTIMIZER["weight_decay"]
    assert weight_decay_by_name("mfsdp", ONE_PROCESS) == reference
    for backend in ("ddp", "fsdp2"):
        results = _run_two_ranks(backend, tmp_path / backend)
        assert all(result["weight_decay"] == reference for result in results), backend


def test_megatron_fsdp_one_call_fully_shard_would_decay_biases_and_layer_norms():
    """The control for the test above: megatron-fsdp's own fully_shard merges the groups (issue 14, defect 4)."""
    model = _model(0)
    model, optimizer = FAKE_MEGATRON_FSDP.fully_shard(model, build_optimizer(model, **OPTIMIZER))
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.01  # AdamW default


def test_megatron_fsdp_optimizer_initialisation_leaves_weights_and_step_counts_untouched():
    model = _model(0)
    before = _weights(model)
    wrapped, optimizer = shard_with_megatron_fsdp(
        FAKE_MEGATRON_FSDP, model, functools.partial(build_optimizer, **OPTIMIZER)
    )
    _assert_same(_weights(wrapped), before)
    assert [group["lr"] for group in optimizer.param_groups] == [OPTIMIZER["lr"]] * 2
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())
    reference, reference_optimizer = _wrap(_model(0), "none", ONE_PROCESS)
    _train(wrapped, optimizer, range(2), rank=0)
    _train(reference, reference_optimizer, range(2), rank=0)
    _assert_same(_weights(wrapped), _weights(reference))
