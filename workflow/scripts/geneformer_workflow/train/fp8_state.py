"""FP8 delayed-scaling state of Transformer Engine modules, saved in training checkpoints as plain tensors.

Delayed scaling (``fp8.recipe: delayed``, the ``4b_te_fp8`` default) quantizes each GEMM operand with a scale
computed from the history of its absolute maxima, so an exact resume needs every TE module's scales and amax
histories. TE's own carrier for them, the ``_extra_state`` entry, does not survive our checkpoints:

- TE 2.x writes it as a pickle in a uint8 tensor after an FP8 forward, but as ``empty(0)`` on a freshly built
  module (``module/base.py`` ``get_extra_state`` ~l.1354-1416), so DCP's load planner meets a size mismatch;
- TE 2.20 refuses to unpickle it unless ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` (``module/base.py``
  ``set_extra_state`` ~l.1419-1440, ``_extra_state.py``), and a checkpoint should never hold a pickle;
- megatron-fsdp removes every ``*_extra_state`` key from its state dicts (``fully_shard.py`` ~l.430-441).

So checkpoints leave ``_extra_state`` out (``checkpoint.AppState``) and hold the tensors themselves, under
``app.fp8.<module>.<scaling_fwd|scaling_bwd>.<scale|amax_history>``, named as in the unwrapped model so that
they move between backends. They are restored the way TE's ``set_extra_state`` restores the unpickled dict
(~l.1460-1480): set the recipe and the GEMM count, ``init_fp8_meta_tensors(recipe)``, copy the tensors. TE's first
FP8 forward then keeps them: ``set_meta_tensor`` returns early for initialised delayed-scaling state (~l.1110-1116).

Current scaling and MXFP8 keep no state (``_extra_state.py`` ``_RECIPE_POLICIES``): nothing is saved for them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)

DIRECTIONS = ("scaling_fwd", "scaling_bwd")  # TE's fp8_meta keys: forward (x, w, out) and backward (dy, dx) GEMMs
TENSORS = ("scale", "amax_history")  # DelayedScalingRecipeState's persistent buffers (quantization.py ~l.1415)
FWD_TENSORS_PER_GEMM = 3  # input, weight, output (module/base.py set_meta_tensor ~l.1136)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user model inside a DDP or megatron-fsdp wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model)


def _fp8_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every TE module: those with TE's ``fp8_meta`` dictionary."""
    for name, module in _unwrapped(model).named_modules():
        if isinstance(getattr(module, "fp8_meta", None), dict):
            yield name, module


def delayed_scaling_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live scale and amax-history tensors of every TE module that holds delayed-scaling state, by key."""
    found: dict[str, torch.Tensor] = {}
    for name, module in _fp8_modules(model):
        for direction in DIRECTIONS:
            state = module.fp8_meta.get(direction)
            for tensor_name in TENSORS:
                value = getattr(state, tensor_name, None)
                if isinstance(value, torch.Tensor):
                    found[f"{name}.{direction}.{tensor_name}"] = value
    return found


def _is_fresh(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Scales of 1 and an empty amax history: what TE's first FP8 forward allocates anyway."""
    return all(bool((value == (1 if key.endswith(".scale") else 0)).all()) for key, value in tensors.items())


class Fp8ScalingState(Stateful):
    """The ``fp8`` entry of a checkpoint: delayed-scaling tensors of every TE module, as plain CPU tensors.

    Saving reads the modules' live tensors. Loading needs the shapes first (a fresh module has no FP8 state until
    its first FP8 forward), which :meth:`expect` takes from the checkpoint's metadata; ``load_state_dict`` then
    restores them into the modules. The tensors are the same on every rank (delayed scaling reduces its amaxes over
    the data-parallel group), so DCP stores them once.

    Args:
        model: The (possibly wrapped) model.
        recipe: The run's FP8 recipe; state is restored only under a delayed-scaling recipe.
    """

    def __init__(self, model: nn.Module, recipe: Any) -> None:
        self.model, self.recipe = model, recipe
        self._expected: dict[str, torch.Size] = {}

    def expect(self, shapes: Mapping[str, torch.Size]) -> None:
        """Before a load: the keys and shapes that the checkpoint holds (see ``checkpoint.load_checkpoint``)."""
        self._expected = dict(shapes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the live tensors; before a load, empty tensors of the expected shapes to load into."""
        if self._expected:
            return {key: torch.empty(shape, dtype=torch.float32) for key, shape in self._expected.items()}
        return {key: value.detach().to("cpu", copy=True) for key, value in delayed_scaling_tensors(self.model).items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore every module's scales and amax histories as TE's ``set_extra_state`` does, without a pickle."""
        self._expected = {}
        modules = dict(_fp8_modules(self.model))
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            name, direction, tensor_name = key.rsplit(".", 2)
            if name not in modules or direction not in DIRECTIONS or tensor_name not in TENSORS:
                msg = f"the checkpoint's FP8 state {key!r} belongs to no Transformer Engine module of this model"
                raise ValueError(msg)
            by_module.setdefault(name, {})[f"{direction}.{tensor_name}"] = value
        stale = [name for name, tensors in by_module.items() if not _is_fresh(tensors)]
        if stale and not _is_delayed(self.recipe):
            log.warning(
                "the checkpoint holds FP8 delayed-scaling state, but this run uses fp8.recipe=%s (or no FP8): "
                "it is not restored",
                type(self.recipe).__name__,
            )
            return
        for name in stale:  # fresh state equals what the first FP8 forward allocates: nothing to restore
            _restore(modules[name], by_module[name], self.recipe)


def _is_delayed(recipe: Any) -> bool:
    delayed = getattr(recipe, "delayed", None)
    return bool(delayed()) if callable(delayed) else False


def _restore(module: nn.Module, tensors: Mapping[str, torch.Tensor], recipe: Any) -> None:
    """Allocate the module's delayed-scaling state for ``recipe`` and copy the saved tensors into it."""
    meta = module.fp8_meta
    meta["recipe"] = recipe
    meta["num_gemms"] = tensors["scaling_fwd.scale"].numel() // FWD_TENSORS_PER_GEMM
    module.init_fp8_meta_tensors(recipe)
    with torch.no_grad():
        for key, value in tensors.items():
            direction, tensor_name = key.split(".")
            target = getattr(meta[direction], tensor_name)
            if target.shape != value.shape:
                msg = (
                    f"cannot restore the FP8 state {key} of {type(module).__name__}: the checkpoint has shape "
                    f"{tuple(value.shape)}, this run {tuple(target.shape)} (fp8.recipe_kwargs.amax_history_len "
                    "changed?); keep the FP8 settings of the run"
                )
                raise ValueError(msg)
            target.copy_(value)
