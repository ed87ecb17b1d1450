"""The backend records: what the trainer, the checkpoints and the config checks ask a backend (no name compares)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from geneformer_workflow.train.backends import BACKEND_CHOICES, BACKENDS, ModelBuild, resolve_backend
from geneformer_workflow.train.distributed import DistributedConfig, Runtime

CPU = torch.device("cpu")


def runtime(world_size: int = 1) -> Runtime:
    backend = "gloo" if world_size > 1 else None  # only the sizes matter here: no process group is started
    return Runtime(dist=DistributedConfig(rank=0, world_size=world_size), device=CPU, backend=backend)


def test_every_config_choice_is_auto_or_a_record():
    assert BACKEND_CHOICES == ("auto", "none", "ddp", "fsdp2", "mfsdp")
    assert all(BACKENDS[name].name == name for name in BACKEND_CHOICES[1:])


@pytest.mark.parametrize(("world_size", "expected"), [(1, "none"), (2, "fsdp2")])
def test_auto_is_fsdp2_for_several_processes_and_none_for_one(world_size, expected):
    assert resolve_backend("auto", runtime(world_size)) is BACKENDS[expected]


def test_a_one_process_backend_with_several_processes_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"backend.name=none cannot train with WORLD_SIZE=2; use auto, fsdp2 or ddp"):
        resolve_backend("none", runtime(2))
    with pytest.raises(ValueError, match=r"backend.name='fsdp3' is not one of auto, none, ddp, fsdp2, mfsdp"):
        resolve_backend("fsdp3", runtime(1))


def test_only_megatron_fsdp_needs_cuda_and_only_fsdp2_casts_its_parameters():
    assert [name for name, b in BACKENDS.items() if b.needs_cuda] == ["mfsdp"]
    assert [name for name, b in BACKENDS.items() if b.casts_parameters] == ["fsdp2"]
    assert [name for name, b in BACKENDS.items() if b.weight_prefix] == ["mfsdp"]


@pytest.mark.parametrize("name", ["none", "ddp", "fsdp2", "mfsdp"])
def test_autocast_only_for_low_precision_without_a_casting_wrapper(name):
    backend = BACKENDS[name]
    assert isinstance(backend.autocast(CPU, torch.float32), contextlib.nullcontext)
    low = backend.autocast(CPU, torch.bfloat16)
    assert isinstance(low, contextlib.nullcontext) == (name == "fsdp2")


class Recorder(torch.nn.Linear):
    """A module with DDP's ``no_sync`` that records when it is entered."""

    entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        Recorder.entered += 1
        yield


@pytest.mark.parametrize("name", ["none", "ddp", "fsdp2", "mfsdp"])
def test_only_ddp_skips_the_all_reduce_on_accumulation_micro_batches(name):
    Recorder.entered = 0
    model = Recorder(2, 2)
    with BACKENDS[name].gradient_sync(model, sync=False):
        pass
    with BACKENDS[name].gradient_sync(model, sync=True):
        pass
    assert Recorder.entered == (1 if name == "ddp" else 0)


def test_the_plain_backend_builds_seeded_weights_and_round_trips_its_state():
    def initial():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    build = ModelBuild(
        initial_model=initial,
        empty_model=lambda: torch.nn.Linear(3, 2),
        build_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=0.1),
        runtime=runtime(),
        compute_dtype=torch.float32,
    )
    backend = BACKENDS["none"]
    model, optimizer = backend.build(build)
    assert torch.equal(model.weight, initial().weight)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    model_state, optim_state = backend.get_state(model, optimizer)
    other, other_optimizer = backend.build(build)
    result = backend.set_state(other, other_optimizer, model_state, optim_state)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other.weight, model.weight)
    assert other_optimizer.state_dict()["state"][0]["step"] == 1
