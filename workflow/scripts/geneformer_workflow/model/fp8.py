"""FP8 through Transformer Engine: the recipe named by the ``fp8`` config block and the autocast context.

TE is imported only when a function here runs (``require_te``), so this module imports on any machine.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

from .te import require_te

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: FP8 tensor cores
MXFP8_MIN_CAPABILITY = (10, 0)  # Blackwell: MXFP8 block scaling
# Short names for fp8.recipe; an import path (transformer_engine.common.recipe.DelayedScaling) works too.
FP8_RECIPES: dict[str, str] = {
    "delayed": "DelayedScaling",
    "current": "Float8CurrentScaling",
    "mxfp8": "MXFP8BlockScaling",
}
_RECIPE_MODULE = "transformer_engine.common.recipe"

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def resolve_fp8_recipe(
    recipe_name: str,
    device: torch.device,
    *,
    fp8_format: str = "HYBRID",
    recipe_kwargs: Mapping[str, Any] | None = None,
) -> Any | None:
    """Build the TE FP8 recipe named by the ``fp8`` config block, or None when this GPU cannot run FP8.

    Args:
        recipe_name: ``delayed`` / ``current`` / ``mxfp8`` (see ``FP8_RECIPES``), a class name in
            ``transformer_engine.common.recipe`` or its import path (``fp8.recipe``).
        device: The CUDA device that trains.
        fp8_format: Name in ``transformer_engine.common.recipe.Format`` (``fp8.format``): HYBRID or E4M3.
        recipe_kwargs: Passed to the recipe class (``fp8.recipe_kwargs``); its ``fp8_format`` wins over the above.

    Returns:
        The recipe; None, with a warning, on a GPU below compute capability 8.9: training then runs in bf16.

    Raises:
        ValueError: No CUDA device, an unknown recipe or format, or MXFP8 below compute capability 10.0.
        RuntimeError: Transformer Engine cannot be imported.
    """
    if device.type != "cuda":
        msg = f"fp8.enabled=true needs a CUDA device, got {device}; set fp8.enabled=false"
        raise ValueError(msg)
    require_te("fp8.enabled")
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < FP8_MIN_CAPABILITY:
        _warn_once(
            f"fp8.enabled=true, but {torch.cuda.get_device_name(device)} has compute capability "
            f"{_cc(capability)} < {_cc(FP8_MIN_CAPABILITY)} (no FP8 tensor cores): training in bf16 without FP8. "
            "Set fp8.enabled=false to silence this warning"
        )
        return None
    recipes = importlib.import_module(_RECIPE_MODULE)
    recipe_cls = _recipe_class(recipe_name, recipes)
    if recipe_cls.__name__ == FP8_RECIPES["mxfp8"] and capability < MXFP8_MIN_CAPABILITY:
        msg = (
            f"fp8.recipe={recipe_name} (MXFP8 block scaling) needs compute capability >= "
            f"{_cc(MXFP8_MIN_CAPABILITY)} (Blackwell); this GPU has {_cc(capability)}. Use "
            f"fp8.recipe={_RECIPE_MODULE}.DelayedScaling or {_RECIPE_MODULE}.Float8CurrentScaling"
        )
        raise ValueError(msg)
    if not hasattr(recipes.Format, fp8_format):
        msg = f"fp8.format={fp8_format!r} is not a transformer_engine.common.recipe.Format name; use HYBRID or E4M3"
        raise ValueError(msg)
    kwargs = {"fp8_format": getattr(recipes.Format, fp8_format), **dict(recipe_kwargs or {})}
    return recipe_cls(**kwargs)


def _recipe_class(recipe_name: str, recipes: ModuleType) -> type:
    name = FP8_RECIPES.get(recipe_name, recipe_name)
    module_name, _, class_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else recipes
        recipe_cls = getattr(module, class_name)
    except (ImportError, AttributeError) as err:
        msg = (
            f"fp8.recipe={recipe_name!r} names no TE recipe class; use one of {', '.join(FP8_RECIPES)} or an import "
            f"path such as {_RECIPE_MODULE}.DelayedScaling"
        )
        raise ValueError(msg) from err
    if not isinstance(recipe_cls, type) or not issubclass(recipe_cls, recipes.Recipe):
        msg = f"fp8.recipe={recipe_name!r} is not a subclass of {_RECIPE_MODULE}.Recipe"
        raise ValueError(msg)
    return recipe_cls


def _cc(capability: tuple[int, ...]) -> str:
    return ".".join(str(c) for c in capability)


def fp8_autocast_context(
    enabled: bool,
    recipe_name: str | Any,
    device: torch.device,
    *,
    fp8_format: str = "HYBRID",
    recipe_kwargs: Mapping[str, Any] | None = None,
    amax_reduction_group: Any = None,
) -> contextlib.AbstractContextManager:
    """The context to run a TE model's forward pass in: ``te.autocast`` with the recipe, or a no-op.

    Use it around the forward only (the backward may run outside), once per micro-batch, inside the bf16
    ``torch.autocast`` when there is one. Returns ``contextlib.nullcontext()`` when ``enabled`` is False or the
    GPU cannot run FP8 (see ``resolve_fp8_recipe``, which warns once).

    Args:
        enabled: ``fp8.enabled``.
        recipe_name: As in ``resolve_fp8_recipe``, or a recipe object it returned (build it once, not per step).
        device: The CUDA device that trains.
        fp8_format: ``fp8.format``.
        recipe_kwargs: ``fp8.recipe_kwargs``.
        amax_reduction_group: Process group over which delayed scaling reduces its amaxes (the data-parallel
            group, e.g. ``torch.distributed.group.WORLD``); None = TE's default.
    """
    if not enabled:
        return contextlib.nullcontext()
    recipe = recipe_name
    if isinstance(recipe_name, str):
        recipe = resolve_fp8_recipe(recipe_name, device, fp8_format=fp8_format, recipe_kwargs=recipe_kwargs)
    if recipe is None:
        return contextlib.nullcontext()
    te = require_te("fp8.enabled")
    autocast = getattr(te, "autocast", None)
    if autocast is not None:
        return autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_reduction_group)
    # Older TE releases only have the (now deprecated) fp8_autocast.
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_reduction_group)
