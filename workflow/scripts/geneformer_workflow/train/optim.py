"""AdamW with BERT's weight-decay groups and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

SCHEDULES = ("linear", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Biases and LayerNorm weights get no weight decay (BERT's recipe, also Geneformer's through
    the Hugging Face ``Trainer``). Both are exactly the parameters with fewer than 2 dimensions,
    a test that does not depend on module names and so also holds for Transformer Engine
    layers and for FSDP2's DTensor parameters (their ``ndim`` is the global one).

    Returns:
        Two groups, each with ``params``, ``weight_decay`` and ``names`` (for logging and tests).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append((name, param))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, adamw_kwargs: dict[str, Any]
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``adamw_kwargs`` pass through (``betas``, ``eps``, ``fused``, ...)."""
    if "weight_decay" in adamw_kwargs or "lr" in adamw_kwargs:
        msg = "set optimizer.lr and optimizer.weight_decay, not inside optimizer.adamw_kwargs"
        raise ValueError(msg)
    kwargs = dict(adamw_kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, **kwargs)


def lr_factor(step: int, *, warmup_steps: int, decay_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index ``step``.

    Warmup rises linearly to 1 over ``warmup_steps`` steps (step 0 already gets ``1 / warmup_steps``,
    so no step is wasted at LR 0); afterwards the factor decays to ``min_lr_ratio`` at
    ``decay_steps`` (linearly, or along a half cosine) and stays there.

    Example:
        >>> [round(lr_factor(s, warmup_steps=2, decay_steps=6, schedule="linear", min_lr_ratio=0.0), 3)
        ...  for s in range(7)]
        [0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step + 1 - warmup_steps) / span)
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        msg = f"scheduler.name={schedule!r} is not one of {', '.join(SCHEDULES)}"
        raise ValueError(msg)
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, decay_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; call ``step()`` once per optimizer step.

    Create it after the model is wrapped and the optimizer built from the wrapped parameters:
    FSDP2 replaces parameters with DTensors, and megatron-fsdp replaces the optimizer itself.
    """
    if name not in SCHEDULES:
        msg = f"scheduler.name={name!r} is not one of {', '.join(SCHEDULES)}"
        raise ValueError(msg)
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        msg = f"scheduler.warmup_steps={warmup_steps} must be >= 0 and scheduler.min_lr_ratio={min_lr_ratio} in [0, 1]"
        raise ValueError(msg)
    factor: Callable[[int], float] = partial(
        lr_factor, warmup_steps=warmup_steps, decay_steps=decay_steps, schedule=name, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
