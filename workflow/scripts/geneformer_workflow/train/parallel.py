"""Wrapping the model for data parallelism: one function per backend, with parallel names (the records that
use them: :mod:`.backends`).

=========  ======================================  ==========================================
backend    function                                where it runs
=========  ======================================  ==========================================
none       (no wrapper)                            one process, CPU or GPU
ddp        :func:`wrap_model_ddp`                  gloo (CPU) or NCCL (GPU); full replicas
fsdp2      :func:`wrap_model_fsdp2`                gloo or NCCL; ``torch.distributed.fsdp.fully_shard``
mfsdp      :func:`wrap_model_mfsdp`                NCCL only (megatron-fsdp calls ``torch.cuda``)
=========  ======================================  ==========================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import SetupError
from .distributed import Runtime

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on GPU, fp32 on CPU. bf16 on CPU is refused (slow, and untested with gloo)."""
    if name not in PRECISIONS:
        msg = f"training.precision={name!r} is not one of {', '.join(PRECISIONS)}"
        raise ValueError(msg)
    if name == "bf16" and device.type != "cuda":
        msg = "training.precision=bf16 needs a CUDA device; set training.precision=auto or fp32 on CPU"
        raise ValueError(msg)
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def wrap_model_fsdp2(
    model: nn.Module, runtime: Runtime, *, compute_dtype: torch.dtype, fully_shard_kwargs: dict[str, Any]
) -> nn.Module:
    """Shard each encoder layer, then the root (embeddings, MLM head, tied decoder) with FSDP2.

    Parameters become DTensors sharded on dim 0 over a 1-D mesh of all ranks. With bf16, FSDP2
    all-gathers bf16 parameters and reduce-scatters gradients in fp32; the sharded master
    weights and optimizer state stay fp32. Parameter names do not change.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.dist.world_size,), mesh_dim_names=("dp",))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if not any(p.is_meta for p in model.parameters()):
        model.to(runtime.device)  # a meta-device model is materialised after sharding (load_full_from_rank0)
    for layer in model.encoder_layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, mp_policy=policy, **fully_shard_kwargs)
    return model


def load_full_from_rank0(sharded: nn.Module, full: nn.Module | None, runtime: Runtime) -> None:
    """Materialise an FSDP2 model built on the meta device with the weights of ``full``, held by rank 0 only.

    Only rank 0 ever holds the whole model (on CPU); the others allocate just their shards, which rank 0's
    weights are broadcast into. So a node of 8 ranks needs one full copy of host memory instead of 8 (about
    12 GB each for the 2.9 B-parameter 4b model), and every rank starts from exactly rank 0's weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sharded.to_empty(device=runtime.device)  # FSDP2 keeps tied parameters tied through to_empty
    state = full.state_dict() if full is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(sharded, state, options=options)


def wrap_model_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Replicate the model with ``DistributedDataParallel`` (the simple baseline)."""
    from torch.nn.parallel import DistributedDataParallel

    model.to(runtime.device)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


# Keys of backend.mfsdp_kwargs that megatron-fsdp's fully_shard_optimizer takes as well (fully_shard.py ~l.453).
_MFSDP_OPTIMIZER_KWARGS = ("preproc_state_dict_for_dcp_ckpt",)


def wrap_model_mfsdp(
    model: nn.Module,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    runtime: Runtime,
    *,
    fully_shard_kwargs: dict[str, Any],
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Shard model and optimizer with megatron-fsdp (GPU only); returns the wrapped pair.

    ``build_optimizer(wrapped_model)`` builds the optimizer over the sharded parameters, with this project's
    parameter groups (see :func:`shard_with_megatron_fsdp`). Build the LR scheduler after this call. Known hazard
    (see docs/training.md): ``clip_grad_norm_`` has hung with several processes on some containers
    (``training.max_grad_norm=null`` turns clipping off).

    Raises:
        SetupError: without CUDA, or when ``megatron_fsdp`` cannot be imported.
    """
    if runtime.device.type != "cuda":
        msg = "backend.name=mfsdp needs CUDA GPUs (megatron-fsdp calls torch.cuda); use backend.name=fsdp2 on CPU"
        raise SetupError(msg)
    try:
        import megatron_fsdp
    except Exception as err:  # the TE meta package raises RuntimeError, not ImportError, at import
        msg = f"backend.name=mfsdp needs megatron-fsdp (pip install '.[gpu]'); importing it failed: {err!r}"
        raise SetupError(msg) from err
    from torch.distributed.device_mesh import init_device_mesh

    log.warning(
        "clip_grad_norm_ has hung with multi-process megatron-fsdp on some containers: if the first step hangs, "
        "set training.max_grad_norm=null"
    )
    # megatron-fsdp expects a (dp, tp) mesh even without tensor parallelism.
    mesh = init_device_mesh("cuda", (runtime.dist.world_size, 1), mesh_dim_names=("dp", "tp"))
    model.to(runtime.device)
    return shard_with_megatron_fsdp(
        megatron_fsdp,
        model,
        build_optimizer,
        fsdp_unit_modules=[type(model.encoder_layers[0])],
        device_mesh=mesh,
        dp_shard_dim="dp",
        tp_dim="tp",
        **fully_shard_kwargs,
    )


def shard_with_megatron_fsdp(
    api: Any, model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer], **model_kwargs: Any
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """megatron-fsdp's ``fully_shard``, in its three documented steps, keeping the optimizer's parameter groups.

    ``api`` is the ``megatron_fsdp`` package (0.6.1; ``fully_shard_model`` and ``fully_shard_optimizer`` are in its
    ``fully_shard.py``). Its one-call ``fully_shard`` clears the optimizer's
    parameter groups and adds one with every parameter (``fully_shard.py`` ~l.749-753), so AdamW's default weight
    decay would hit biases and LayerNorm weights too. Instead, as ``fully_shard_optimizer``'s docstring shows:
    ``fully_shard_model``, ``_replace_param_with_distributed_if_needed()`` (the sharded DTensor parameters, with
    their global shapes, so :func:`.optim.param_groups` splits them as on every other backend), the optimizer over
    them, then ``fully_shard_optimizer``.

    ``fully_shard_optimizer`` initialises the optimizer state by one ``optimizer.step()`` on zero gradients
    (~l.503-513). For AdamW that step still applies weight decay and counts a step; it runs here with learning
    rate 0 and the step counts are reset, so the first real step is the same as on the other backends.
    """
    optimizer_kwargs = {key: model_kwargs[key] for key in _MFSDP_OPTIMIZER_KWARGS if key in model_kwargs}
    wrapped = api.fully_shard_model(module=model, **model_kwargs)
    wrapped._replace_param_with_distributed_if_needed()
    optimizer = build_optimizer(wrapped)
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer = api.fully_shard_optimizer(optimizer, **optimizer_kwargs)
    for group, lr in zip(optimizer.param_groups, learning_rates, strict=True):
        group["lr"] = lr
    for state in optimizer.state.values():
        if "step" in state:
            step = state["step"]
            state["step"] = step.zero_() if isinstance(step, torch.Tensor) else 0
    return wrapped, optimizer


def unwrap(model: nn.Module) -> nn.Module:
    """The user model inside a DDP or megatron-fsdp wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model)
