"""The data-parallel backends, one :class:`Backend` record each: a new backend is one entry in :data:`BACKENDS`.

A record says how the backend builds the wrapped model and its optimizer, how gradient accumulation skips
synchronisation, whether compute needs autocast, how model and optimizer state are read and restored for a
checkpoint, and whether it needs CUDA. The trainer, the checkpoint code and the config checks ask the record;
none of them compares backend names. The wrapping functions themselves are in :mod:`.parallel`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .distributed import Runtime
from .parallel import load_full_from_rank0, wrap_model_ddp, wrap_model_fsdp2, wrap_model_mfsdp

Optimizer = torch.optim.Optimizer


@dataclass(frozen=True)
class ModelBuild:
    """What a backend needs to build the model it trains and the optimizer over its parameters.

    Attributes:
        initial_model: The seeded initial weights on CPU, the same on every rank that calls it.
        empty_model: The same architecture without storage (built on the meta device).
        build_optimizer: The optimizer over a (wrapped) model's parameters, with this project's groups.
        runtime: Device and process group.
        compute_dtype: fp32 or bf16.
        kwargs: The backend's own options from the config (``backend.<kwargs_key>``).
    """

    initial_model: Callable[[], nn.Module]
    empty_model: Callable[[], nn.Module]
    build_optimizer: Callable[[nn.Module], Optimizer]
    runtime: Runtime
    compute_dtype: torch.dtype
    kwargs: dict[str, Any] = field(default_factory=dict)


class LoadResult(Protocol):
    """What loading a state dict reports (``torch.nn.modules.module._IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _dcp_state(model: nn.Module, optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state through ``torch.distributed.checkpoint.state_dict`` (plain, DDP and FSDP2 give the
    same keys, so checkpoints move between these backends and world sizes)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def _set_dcp_state(
    model: nn.Module, optimizer: Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> LoadResult:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(strict=False)  # TE's _extra_state is absent by design (checkpoint.check_loaded_keys)
    return set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options
    )


def _own_state(model: nn.Module, optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The wrapper's own state dicts (megatron-fsdp's are DCP-ready DTensors)."""
    return model.state_dict(), optimizer.state_dict()


def _set_own_state(
    model: nn.Module, optimizer: Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> LoadResult:
    result = model.load_state_dict(model_state, strict=False)
    optimizer.load_state_dict(optim_state)
    return result


def _build_plain(build: ModelBuild) -> tuple[nn.Module, Optimizer]:
    model = build.initial_model().to(build.runtime.device)
    return model, build.build_optimizer(model)


def _build_ddp(build: ModelBuild) -> tuple[nn.Module, Optimizer]:
    model = wrap_model_ddp(build.initial_model(), build.runtime)
    return model, build.build_optimizer(model)


def _build_fsdp2(build: ModelBuild) -> tuple[nn.Module, Optimizer]:
    """Rank 0 builds the full model; the others build it on the meta device and receive their shards."""
    full = build.initial_model() if build.runtime.dist.is_main else None
    with torch.device("meta"):
        model = build.empty_model()
    model = wrap_model_fsdp2(model, build.runtime, compute_dtype=build.compute_dtype, fully_shard_kwargs=build.kwargs)
    load_full_from_rank0(model, full, build.runtime)
    return model, build.build_optimizer(model)


def _build_mfsdp(build: ModelBuild) -> tuple[nn.Module, Optimizer]:
    """megatron-fsdp shards the model, then the optimizer is built over its shards."""
    return wrap_model_mfsdp(
        build.initial_model(), build.build_optimizer, build.runtime, fully_shard_kwargs=build.kwargs
    )


def _ddp_no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    return model.no_sync()


@dataclass(frozen=True)
class Backend:
    """One data-parallel backend (``backend.name``).

    Attributes:
        name: The config value, also recorded in ``checkpoint.json``.
        build: Builds the wrapped model and its optimizer (:class:`ModelBuild`).
        multi_process: Trains with several processes (``none`` cannot).
        needs_cuda: Why it cannot run on CPU, or None when it can.
        casts_parameters: The wrapper computes in the low precision itself (FSDP2's ``MixedPrecisionPolicy``), so
            no autocast; megatron-fsdp 0.6.1's policy sets only main-weight and gradient dtypes, so it needs autocast.
        no_sync: On accumulation micro-batches other than the last, the context that skips the gradient all-reduce
            (DDP), or None: FSDP2 reduce-scatters each micro-batch into sharded gradients (low memory) and
            megatron-fsdp accumulates by itself.
        get_state: Model and optimizer state for a DCP checkpoint.
        set_state: Restores them in place (non-strict; the caller checks the keys).
        weight_prefix: Prefix of the model keys in its checkpoints (megatron-fsdp's wrapper adds ``module.``).
        kwargs_key: The config key under ``backend`` with its options, or None.
    """

    name: str
    build: Callable[[ModelBuild], tuple[nn.Module, Optimizer]]
    multi_process: bool = True
    needs_cuda: str | None = None
    casts_parameters: bool = False
    no_sync: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    get_state: Callable[[nn.Module, Optimizer], tuple[dict[str, Any], dict[str, Any]]] = _dcp_state
    set_state: Callable[[nn.Module, Optimizer, dict[str, Any], dict[str, Any]], LoadResult] = _set_dcp_state
    weight_prefix: str = ""
    kwargs_key: str | None = None

    def gradient_sync(self, model: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's backward: no all-reduce unless ``sync`` (the last micro-batch)."""
        if self.no_sync is not None and not sync:
            return self.no_sync(model)
        return contextlib.nullcontext()

    def autocast(self, device: torch.device, compute_dtype: torch.dtype) -> contextlib.AbstractContextManager:
        """bf16 autocast on GPU, unless the wrapper casts the parameters itself."""
        if compute_dtype == torch.float32 or self.casts_parameters:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=compute_dtype)


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("none", _build_plain, multi_process=False),
        Backend("ddp", _build_ddp, no_sync=_ddp_no_sync),
        Backend("fsdp2", _build_fsdp2, casts_parameters=True, kwargs_key="fully_shard_kwargs"),
        Backend(
            "mfsdp",
            _build_mfsdp,
            needs_cuda="needs CUDA GPUs (megatron-fsdp calls torch.cuda)",
            get_state=_own_state,
            set_state=_set_own_state,
            weight_prefix="module.",
            kwargs_key="mfsdp_kwargs",
        ),
    )
}
AUTO = "auto"  # fsdp2 for several processes, none for one
BACKEND_CHOICES = (AUTO, *BACKENDS)


def resolve_backend(name: str, runtime: Runtime) -> Backend:
    """``auto`` → ``fsdp2`` for several processes, ``none`` for one; check the others fit the job."""
    if name not in BACKEND_CHOICES:
        msg = f"backend.name={name!r} is not one of {', '.join(BACKEND_CHOICES)}"
        raise ValueError(msg)
    if name == AUTO:
        return BACKENDS["fsdp2" if runtime.dist.is_distributed else "none"]
    backend = BACKENDS[name]
    if not backend.multi_process and runtime.dist.is_distributed:
        msg = single_process_error(name, runtime.dist.world_size)
        raise ValueError(msg)
    return backend


def single_process_error(name: str, world_size: int) -> str:
    """The message for a one-process backend asked to train with several processes."""
    return f"backend.name={name} cannot train with WORLD_SIZE={world_size}; use auto, fsdp2 or ddp"
