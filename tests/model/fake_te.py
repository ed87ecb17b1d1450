"""A CPU stand-in for ``transformer_engine.pytorch`` 2.20 that follows its source where our code depends on it.

Transformer Engine needs CUDA, so the CPU tests use this module instead. Each behaviour below is TE 2.20.2's, with
the place it comes from (paths under ``transformer_engine/pytorch/``, line numbers approximate):

- **meta device**: ``te.Linear`` defers initialisation only when ``device == "meta"`` compares equal as written,
  which a ``torch.device`` does not (``module/linear.py`` ~l.2046, ~l.2242); otherwise ``reset_parameters`` moves
  meta parameters to the GPU and initialises them (``module/base.py`` ~l.1804-1833). Here the "GPU" is the CPU, and
  ``materialized`` records that it happened. ``te.LayerNorm`` canonicalises the device, so both spellings work
  (``ops/basic/layer_norm.py`` ~l.96).
- **extra state**: a uint8 tensor, ``empty(0)`` until an FP8 forward ran (and for stateless recipes), else a pickle of
  the recipe, scales and amax histories (``module/base.py`` ``get_extra_state`` ~l.1354); ``set_extra_state`` ignores
  ``None`` and empty tensors and refuses a pickle, or an ``io.BytesIO``, unless
  ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` (~l.1419-1440, ``_extra_state.py``). ``te.LayerNorm`` (an op, no GEMM)
  always writes ``empty(0)`` (``ops/op.py`` ~l.632).
- **delayed scaling**: ``init_fp8_metadata`` at each forward (``module/base.py`` ~l.1528), ``set_meta_tensor`` with 3
  scales per GEMM forward and 2 backward, and an early return for initialised delayed-scaling state (~l.1106-1140);
  ``DelayedScalingRecipeState``: ``scale`` ones, ``amax_history`` zeros ``(amax_history_len, n)``
  (``quantization.py`` ~l.1397-1445); at the end of an FP8 region the amaxes are reduced over the group and the
  scales updated: ``_amax_and_scale_update`` / ``_default_sf_compute`` (~l.1066-1165).
- **attention**: a ``(B, 1, 1, T)`` bool mask with True = masked out, turned into sequence lengths, so right padding
  is assumed (``attention/dot_product_attention/utils.py`` ``get_cu_seqlens`` ~l.2229); ``thd`` needs int32
  ``cu_seqlens`` (``dot_product_attention.py`` ~l.2462).

Emulated, not TE's: the FP8 GEMM (operands cast to ``torch.float8_e4m3fn`` and back with the module's scales, the
amax recorded in ``amax_history[0]``, gradients passed straight through; backward amaxes from the output gradient).
The backward scales are updated, as in TE, when the backward of the region's first FP8 module has run (TE:
``reduce_and_update_bwd_fp8_tensors`` in ``module/base.py``; here a hook on that module's input).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
E4M3_MAX = 448.0


# ----------------------------------------------------------------------------------------------- recipes
@dataclass
class DelayedScaling:
    """``transformer_engine.common.recipe.DelayedScaling`` (the fields the stand-in uses)."""

    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0

    def delayed(self) -> bool:
        return True


@dataclass
class Float8CurrentScaling:
    """A stateless recipe: nothing in the extra state (``_extra_state.py`` ``_RECIPE_POLICIES``)."""

    def delayed(self) -> bool:
        return False


class DelayedScalingRecipeState:
    """``quantization.py`` ~l.1397: persistent ``scale`` and ``amax_history`` buffers."""

    def __init__(self, recipe: DelayedScaling, num_quantizers: int, device: torch.device) -> None:
        self.recipe = recipe
        self.scale = torch.ones(num_quantizers, dtype=torch.float32, device=device)
        self.amax_history = torch.zeros(recipe.amax_history_len, num_quantizers, dtype=torch.float32, device=device)


class StatelessRecipeState:
    """Current scaling: no persistent buffers."""


# ----------------------------------------------------------------------------------------------- FP8 regions
class _GlobalState:
    """``FP8GlobalStateManager``: whether an FP8 region is active, its recipe and group, the modules it ran."""

    enabled = False
    recipe: DelayedScaling | Float8CurrentScaling | None = None
    group = None
    modules: ClassVar[list[_BaseModule]] = []


@contextlib.contextmanager
def autocast(enabled: bool = True, recipe=None, amax_reduction_group=None) -> Iterator[None]:
    """``te.autocast``: FP8 inside; on exit the delayed-scaling amaxes are reduced and the scales updated."""
    saved = (_GlobalState.enabled, _GlobalState.recipe, _GlobalState.group, _GlobalState.modules)
    _GlobalState.enabled, _GlobalState.recipe = enabled, recipe or DelayedScaling()
    _GlobalState.group, _GlobalState.modules = amax_reduction_group, []
    try:
        yield
    finally:
        if enabled and _GlobalState.recipe.delayed():
            _update_scales(_GlobalState.modules, "scaling_fwd", _GlobalState.recipe, _GlobalState.group)
        _GlobalState.enabled, _GlobalState.recipe, _GlobalState.group, _GlobalState.modules = saved


def _update_scales(modules: list[_BaseModule], key: str, recipe: DelayedScaling, group) -> None:
    """``reduce_and_update_fp8_tensors``: forward scales at the end of the region, backward ones after its backward."""
    for module in dict.fromkeys(modules):
        _amax_and_scale_update(module.fp8_meta[key], recipe, group)


def _amax_and_scale_update(state: DelayedScalingRecipeState, recipe: DelayedScaling, group) -> None:
    """``quantization.py`` ``_amax_and_scale_update`` after the group's max-reduction of the newest amaxes."""
    if group is not None and dist.is_initialized():
        dist.all_reduce(state.amax_history[0], op=dist.ReduceOp.MAX, group=group)
    history = state.amax_history
    amax = history.max(dim=0).values if recipe.amax_compute_algo == "max" else history[0].clone()
    if history.shape[0] > 1:
        history.copy_(torch.roll(history, -1, 0))
    history[0].fill_(0.0)
    scale = (E4M3_MAX / amax) / (2**recipe.margin)
    scale = torch.where(amax > 0.0, scale, state.scale)
    scale = torch.where(torch.isfinite(amax), scale, state.scale)
    state.scale.copy_(torch.where(torch.isinf(scale), torch.full_like(scale, torch.finfo(torch.float32).max), scale))


def _cast(tensor: torch.Tensor, state: DelayedScalingRecipeState, index: int) -> torch.Tensor:
    """Record the amax, quantize to E4M3 with the current scale and back; gradients pass straight through."""
    with torch.no_grad():
        state.amax_history[0, index] = torch.maximum(state.amax_history[0, index], tensor.detach().abs().max())
        scale = state.scale[index]
        quantized = (tensor.detach() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        restored = quantized.to(tensor.dtype) / scale
    return tensor + (restored - tensor.detach())


# ----------------------------------------------------------------------------------------------- base module
class _BaseModule(nn.Module):
    """``TransformerEngineBaseModule`` (``module/base.py`` ~l.886): FP8 metadata and the extra-state protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.fp8_initialized = False
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_meta: dict = {"fp8_checkpoint": False, "fp8_group": None}
        self.fp8_meta_tensors_initialized = False

    def _state_device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None and not param.is_meta else torch.device("cpu")

    def set_meta_tensor(self, fwd: bool, recipe) -> None:
        key = "scaling_fwd" if fwd else "scaling_bwd"
        if self.fp8_meta_tensors_initialized:
            state = self.fp8_meta[key]
            if recipe.delayed() and isinstance(state, DelayedScalingRecipeState):
                return  # TE adjusts the history length here; the tests keep it fixed
            if not recipe.delayed() and isinstance(state, StatelessRecipeState):
                return
        count = self.fp8_meta["num_gemms"] * (3 if fwd else 2)
        if recipe.delayed():
            self.fp8_meta[key] = DelayedScalingRecipeState(recipe, count, self._state_device())
        else:
            self.fp8_meta[key] = StatelessRecipeState()

    def init_fp8_meta_tensors(self, recipe) -> None:
        self.set_meta_tensor(True, recipe)
        self.set_meta_tensor(False, recipe)
        self.fp8_meta_tensors_initialized = True

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        meta = self.fp8_meta
        self.fp8 = _GlobalState.enabled
        meta["fp8_checkpoint"] = self.fp8
        if not self.fp8:
            self.fp8_initialized = False
            return
        if self.fp8_initialized and meta.get("recipe") == _GlobalState.recipe:
            return
        meta["recipe"] = _GlobalState.recipe
        meta["num_gemms"] = num_gemms
        self.init_fp8_meta_tensors(meta["recipe"])
        self.fp8_initialized = True

    def get_extra_state(self) -> torch.Tensor:
        if not (self.fp8_meta["fp8_checkpoint"] or self.fp8 or self.fp8_calibration):
            return torch.empty(0, dtype=torch.uint8)
        recipe = self.fp8_meta["recipe"]
        if not recipe.delayed():
            return torch.empty(0, dtype=torch.uint8)
        state = {"recipe": recipe, "extra_fp8_variables": {"num_gemms": self.fp8_meta["num_gemms"]}}
        for key, suffix in (("scaling_fwd", "fwd"), ("scaling_bwd", "bwd")):
            state[f"scale_{suffix}"] = self.fp8_meta[key].scale.cpu()
            state[f"amax_history_{suffix}"] = self.fp8_meta[key].amax_history.cpu()
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is None:
            return
        if isinstance(state, torch.Tensor):
            if state.numel() == 0:
                return
            if os.environ.get(UNSAFE_PICKLE_ENV, "0") != "1":
                msg = f"Refusing to load pickled Transformer Engine extra state for {type(self).__name__}"
                raise RuntimeError(msg)
            state = pickle.loads(state.numpy().tobytes())
        elif isinstance(state, io.BytesIO):
            if os.environ.get(UNSAFE_PICKLE_ENV, "0") != "1":
                msg = f"Refusing to load pickled Transformer Engine extra state for {type(self).__name__}"
                raise RuntimeError(msg)
            state.seek(0)
            state = torch.load(state, weights_only=False)
        else:
            msg = "Unsupported checkpoint format."
            raise RuntimeError(msg)
        self.fp8_meta.update(state["extra_fp8_variables"])
        self.fp8_meta["recipe"] = state["recipe"]
        self.init_fp8_meta_tensors(state["recipe"])
        for key, suffix in (("scaling_fwd", "fwd"), ("scaling_bwd", "bwd")):
            self.fp8_meta[key].scale.copy_(state[f"scale_{suffix}"])
            self.fp8_meta[key].amax_history.copy_(state[f"amax_history_{suffix}"])


# ----------------------------------------------------------------------------------------------- modules
class Linear(_BaseModule):
    """``te.Linear(in, out, bias=True, device=...)``: parameters ``weight`` (out, in) and ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        where = "cpu" if device is None or torch.device(device).type == "cuda" else device  # the CPU plays the GPU
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=where))
        self.bias = nn.Parameter(torch.empty(out_features, device=where)) if bias else None
        self.materialized = False
        self.rows_seen: list[int] = []
        self.reset_parameters(defer_init=device == "meta")

    def reset_parameters(self, defer_init: bool = False) -> None:
        if defer_init:
            return
        for name, param in list(self.named_parameters(recurse=False)):
            if param.is_meta:  # module/base.py ~l.1820: materialised on the GPU, then initialised
                self.materialized = True
                param = nn.Parameter(torch.empty_like(param, device="cpu"))
                setattr(self, name, param)
            with torch.no_grad():
                if name == "weight":
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                else:
                    param.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen.append(x.numel() // x.shape[-1])
        self.init_fp8_metadata(num_gemms=1)
        if not self.fp8 or not self.fp8_meta["recipe"].delayed():
            return F.linear(x, self.weight, self.bias)
        region = _GlobalState.modules
        if not region and x.requires_grad:  # the first FP8 module runs the last backward: then update (base.py)
            recipe, group = _GlobalState.recipe, _GlobalState.group
            x.register_hook(lambda _grad: _update_scales(region, "scaling_bwd", recipe, group))
        region.append(self)
        forward_state, backward_state = self.fp8_meta["scaling_fwd"], self.fp8_meta["scaling_bwd"]
        y = F.linear(_cast(x, forward_state, 0), _cast(self.weight, forward_state, 1), self.bias)
        if y.requires_grad:
            y.register_hook(lambda grad: _record_backward_amax(backward_state, grad))
        return y


def _record_backward_amax(state: DelayedScalingRecipeState, grad: torch.Tensor) -> None:
    with torch.no_grad():
        state.amax_history[0, 0] = torch.maximum(state.amax_history[0, 0], grad.abs().max())


class LayerNorm(nn.LayerNorm):
    """``te.LayerNorm(size, eps=..., device=...)``: an op without GEMMs, so its extra state is always ``empty(0)``."""

    def __init__(self, size: int, eps: float = 1e-5, device=None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        super().__init__(size, eps=eps, device="meta" if device.type == "meta" else "cpu")

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is not None and state.numel() != 0 and os.environ.get(UNSAFE_PICKLE_ENV, "0") != "1":
            msg = "Refusing to load pickled Transformer Engine extra state for LayerNorm"
            raise RuntimeError(msg)


class DotProductAttention(_BaseModule):
    """bshd + ``(B, 1, 1, T)`` mask (True = masked out, right padding), or thd + int32 ``cu_seqlens``; SDPA inside."""

    def __init__(self, num_attention_heads, kv_channels, attention_dropout, qkv_format, attn_mask_type) -> None:
        super().__init__()
        assert (qkv_format, attn_mask_type) == ("bshd", "padding")
        self.heads, self.head_dim, self.dropout_p = num_attention_heads, kv_channels, attention_dropout
        self.formats_seen: list[str] = []

    def forward(self, q, k, v, attention_mask=None, qkv_format=None, attn_mask_type=None, **kwargs):
        assert attn_mask_type == "padding"
        self.init_fp8_metadata(num_gemms=3)  # state allocated, unused: fp8_dpa is off by default
        self.formats_seen.append(qkv_format)
        dropout = self.dropout_p if self.training else 0.0
        if qkv_format == "bshd":
            batch, seq_len = q.shape[:2]
            assert attention_mask.dtype == torch.bool and attention_mask.shape == (batch, 1, 1, seq_len)
            assert not kwargs
            lengths = attention_mask.reshape(batch, seq_len).logical_not().sum(dim=1)  # get_cu_seqlens
            keep = torch.arange(seq_len)[None, :] < lengths[:, None]  # right padding assumed, as in TE
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=dropout)
            return out.transpose(1, 2).reshape(batch, seq_len, -1)  # (B, T, N*D) as TE returns it
        assert qkv_format == "thd" and attention_mask is None and q.dim() == 3
        cu = kwargs["cu_seqlens_q"]
        assert cu.dtype == torch.int32, "cu_seqlens_q and cu_seqlens_q must both be in dtype torch.int32!"
        assert kwargs["cu_seqlens_kv"] is cu
        assert isinstance(kwargs["max_seqlen_q"], int) and kwargs["max_seqlen_q"] == kwargs["max_seqlen_kv"]
        outs = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (N, L, D)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout).transpose(0, 1))
        return torch.cat(outs).reshape(q.shape[0], -1)  # (T_total, N*D)


def fake_te() -> types.ModuleType:
    """A ``transformer_engine.pytorch`` stand-in module."""
    te = types.ModuleType("transformer_engine.pytorch")
    te.Linear, te.LayerNorm, te.DotProductAttention, te.autocast = Linear, LayerNorm, DotProductAttention, autocast
    return te
