"""Transformer Engine (TE) primitives, TE <-> Hugging Face weight names, and the FP8 autocast context.

``te_primitives()`` returns a ``Primitives`` bundle built on ``transformer_engine.pytorch``, for the same layer code
as the plain PyTorch path (``layers.py``): ``GeneformerForMaskedLM(cfg, te_primitives())``. TE is imported lazily,
only when one of these functions runs, and every import is guarded with ``except Exception``: on a CPU machine
``pip install transformer-engine`` leaves a meta package whose import raises ``RuntimeError``, not ``ImportError``.

Parameter names do not change: ``te.Linear`` and ``te.LayerNorm`` call their parameters ``weight`` / ``bias`` like
``nn.Linear`` / ``nn.LayerNorm``. TE modules add one ``_extra_state`` entry each to the state dict (their FP8 scaling
metadata, an ``io.BytesIO`` or a uint8 tensor depending on the TE version); ``te_state_dict_to_hf`` drops them and
``hf_state_dict_to_te`` leaves them empty, so a TE-trained checkpoint exports to the Hugging Face names.

Shape legend: B batch, T tokens per sequence (T_total when packed), H hidden, N heads, D head size, R GEMM rows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Primitives, checkpoint_layer
from .packing import PackedSequences

log = logging.getLogger(__name__)

# FP8 GEMMs need the row count (tokens) to be a multiple of 16, MXFP8 of 32 (TE's quantization alignment).
FP8_ROW_MULTIPLE = 32
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: FP8 tensor cores
MXFP8_MIN_CAPABILITY = (10, 0)  # Blackwell: MXFP8 block scaling
# Short names for fp8.recipe; an import path (transformer_engine.common.recipe.DelayedScaling) works too.
FP8_RECIPES: dict[str, str] = {
    "delayed": "DelayedScaling",
    "current": "Float8CurrentScaling",
    "mxfp8": "MXFP8BlockScaling",
}
_RECIPE_MODULE = "transformer_engine.common.recipe"


def require_te(feature: str = "model.use_te") -> ModuleType:
    """Import ``transformer_engine.pytorch`` or raise a ``RuntimeError`` that names ``feature`` and the fix.

    The import is tried first, so a missing or broken TE is reported as such even on a machine without CUDA.
    """
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # the CPU meta package raises RuntimeError at import, not ImportError
        msg = (
            f"{feature}=true needs CUDA + Transformer Engine, but importing transformer_engine.pytorch failed: "
            f"{err!r}. Install it on a GPU machine (pip install '.[gpu]') or set {feature}=false"
        )
        raise RuntimeError(msg) from err
    if not torch.cuda.is_available():
        msg = f"{feature}=true needs CUDA + Transformer Engine; this machine has no CUDA device. Set {feature}=false"
        raise RuntimeError(msg)
    return te


# ---------------------------------------------------------------------------------------------------- primitives
def te_primitives(*, te_module: ModuleType | None = None) -> Primitives:
    """Linear / LayerNorm / attention factories on Transformer Engine, for ``GeneformerForMaskedLM(cfg, prims)``.

    Divergence from HF BERT: none in the function computed. The data flow of each layer is the shared one::

        x ─► te.Linear q, k, v ─► te.DotProductAttention (padding mask / cu_seqlens) ─► te.Linear ─► dropout
          ─► (+x) ─► te.LayerNorm ─► a ─► te.Linear(H→I) ─► ReLU ─► te.Linear(I→H) ─► dropout ─► (+a) ─► te.LayerNorm

    Post-LN, ReLU and a real key-padding mask, exactly as ``TORCH_PRIMITIVES``. The differences are numerical
    (TE kernels, TF32 / bf16 GEMMs) and at padded *query* positions, whose outputs TE may zero instead of
    computing (nothing reads them). Modules are created on CUDA, or on the meta device inside
    ``with torch.device("meta")``. Padded batches must be right-padded (TE turns the mask into sequence lengths).

    Args:
        te_module: The ``transformer_engine.pytorch`` module; None imports it via ``require_te("model.use_te")``
            (CPU tests pass a stand-in).

    Raises:
        RuntimeError: When TE cannot be imported or there is no CUDA device (the message names ``model.use_te``).
    """
    te = require_te("model.use_te") if te_module is None else te_module
    linear_cls = _padded_linear_class(te)

    def linear(in_features: int, out_features: int) -> nn.Module:
        return linear_cls(in_features, out_features, bias=True, device=_te_device())

    def layer_norm(size: int, eps: float) -> nn.Module:
        return te.LayerNorm(size, eps=eps, device=_te_device())

    def attention(num_heads: int, head_dim: int, dropout_p: float) -> nn.Module:
        return TEAttention(num_heads, head_dim, dropout_p, te_module=te)

    return Primitives(
        linear=linear,
        layer_norm=layer_norm,
        attention=attention,
        prepare_mask=TEAttention.prepare_mask,
        checkpoint=_te_checkpoint(te),
    )


def _te_checkpoint(te: ModuleType) -> Callable[..., torch.Tensor]:
    """``te.distributed.checkpoint`` (recomputes under the forward's FP8 state), else PyTorch's."""
    te_checkpoint = getattr(getattr(te, "distributed", None), "checkpoint", None)
    if te_checkpoint is None:
        return checkpoint_layer

    def run(layer: nn.Module, *args: Any) -> torch.Tensor:
        return te_checkpoint(layer, *args, use_reentrant=False)

    return run


def _te_device() -> str | torch.device:
    """Where TE modules put their parameters: the meta device inside ``with torch.device("meta")``, else CUDA."""
    default = torch.get_default_device()
    return default if default.type in ("meta", "cuda") else "cuda"


@functools.cache
def _padded_linear_class(te: ModuleType) -> type[nn.Module]:
    """``te.Linear`` that pads its GEMM rows to a multiple of ``FP8_ROW_MULTIPLE`` when FP8 is on (and when empty).

    The rows are the tokens: any count for packed batches and for the masked-only MLM head (M rows), while FP8
    GEMMs need multiples of 16 (MXFP8: 32). Zero rows are padded too, so a batch without masked tokens works.
    The pad rows are zeros and are sliced off, so they add nothing to the outputs or the gradients.
    """

    class TELinear(te.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.numel() // x.shape[-1]
            pad = FP8_ROW_MULTIPLE if rows == 0 else -rows % FP8_ROW_MULTIPLE
            if pad == 0 or (rows > 0 and not _fp8_enabled()):
                return super().forward(x)
            x_RI = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad))  # (R + pad, in)
            y_RO = super().forward(x_RI)[:rows]  # (R, out)
            return y_RO.reshape(*x.shape[:-1], y_RO.shape[-1])

    return TELinear


def _fp8_enabled() -> bool:
    """Whether a TE FP8 autocast region is active (True when TE's state cannot be read: padding is harmless)."""
    manager = _fp8_state_manager()
    return True if manager is None else bool(manager.is_fp8_enabled())


@functools.cache
def _fp8_state_manager() -> Any | None:
    """TE's ``FP8GlobalStateManager`` (it moved from ``fp8`` to ``quantization``), looked up once."""
    for path in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            return importlib.import_module(path).FP8GlobalStateManager
        except Exception:
            continue
    return None


class TEAttention(nn.Module):
    """Core attention with ``te.DotProductAttention``: "bshd" + padding mask, or "thd" + ``cu_seqlens`` when packed.

    Same contract as ``layers.SDPAttention``: (B, T, N, D) q / k / v and the prepared mask in, (B, T, H) out, and
    attention-probability dropout only in training mode (TE applies ``attention_dropout`` only while training).

    Args:
        num_heads: N.
        head_dim: D.
        dropout_p: Attention-probability dropout while training.
        te_module: The ``transformer_engine.pytorch`` module.
    """

    def __init__(self, num_heads: int, head_dim: int, dropout_p: float, *, te_module: ModuleType) -> None:
        super().__init__()
        self.hidden_size = num_heads * head_dim
        # Its `_extra_state` (FP8 metadata of the attention) is dropped on export like every other TE entry.
        self.dpa = te_module.DotProductAttention(
            num_attention_heads=num_heads,
            kv_channels=head_dim,
            attention_dropout=dropout_p,
            qkv_format="bshd",
            attn_mask_type="padding",
        )

    @staticmethod
    def prepare_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) 1 = token / 0 = pad -> TE's boolean (B, 1, 1, T) padding mask, where True = masked OUT.

        The opposite polarity of SDPA's mask: TE's ``attention_mask`` marks the positions to exclude.
        """
        return ~attention_mask_BT.bool()[:, None, None, :]  # (B, 1, 1, T)

    def forward(
        self,
        query_BTND: torch.Tensor,
        key_BTND: torch.Tensor,
        value_BTND: torch.Tensor,
        mask: torch.Tensor | PackedSequences,
    ) -> torch.Tensor:
        """Attend; q / k / v (B, T, N, D), ``mask`` from ``prepare_mask`` or a ``PackedSequences`` -> (B, T, H)."""
        batch, seq_len = query_BTND.shape[:2]
        if isinstance(mask, PackedSequences):
            ctx = self._attend_packed(query_BTND[0], key_BTND[0], value_BTND[0], mask)  # (T_total, N*D)
        else:
            ctx = self.dpa(
                query_BTND, key_BTND, value_BTND, attention_mask=mask, qkv_format="bshd", attn_mask_type="padding"
            )  # (B, T, N*D)
        return ctx.reshape(batch, seq_len, self.hidden_size)

    def _attend_packed(
        self, query_TND: torch.Tensor, key_TND: torch.Tensor, value_TND: torch.Tensor, packed: PackedSequences
    ) -> torch.Tensor:
        """TE's "thd" layout: each sequence attends only to itself, located by ``cu_seqlens`` (S + 1,) int32."""
        if packed.cu_seqlens.device != query_TND.device:
            msg = (
                f"PackedSequences.cu_seqlens is on {packed.cu_seqlens.device} but the tokens are on "
                f"{query_TND.device}; move it with packed.to(device)"
            )
            raise ValueError(msg)
        return self.dpa(
            query_TND,
            key_TND,
            value_TND,
            qkv_format="thd",
            attn_mask_type="padding",
            cu_seqlens_q=packed.cu_seqlens,
            cu_seqlens_kv=packed.cu_seqlens,
            max_seqlen_q=packed.max_seqlen,  # host ints: TE needs no device sync to find them
            max_seqlen_kv=packed.max_seqlen,
        )


# ---------------------------------------------------------------------------------------------------- names
# HF BertForMaskedLM key -> key in a model built from te_primitives(); `*` is the layer index. te.Linear and
# te.LayerNorm name their parameters `weight` / `bias` exactly like nn.Linear / nn.LayerNorm, and the embeddings and
# the tied decoder stay plain nn modules, so every entry maps to itself. A fused-QKV variant would change the map.
_HF_KEYS: tuple[str, ...] = (
    # embeddings (nn.Embedding) and their LayerNorm (te.LayerNorm)
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    # self-attention projections (te.Linear)
    "bert.encoder.layer.*.attention.self.query.weight",
    "bert.encoder.layer.*.attention.self.query.bias",
    "bert.encoder.layer.*.attention.self.key.weight",
    "bert.encoder.layer.*.attention.self.key.bias",
    "bert.encoder.layer.*.attention.self.value.weight",
    "bert.encoder.layer.*.attention.self.value.bias",
    # attention output projection (te.Linear) and post-LN (te.LayerNorm)
    "bert.encoder.layer.*.attention.output.dense.weight",
    "bert.encoder.layer.*.attention.output.dense.bias",
    "bert.encoder.layer.*.attention.output.LayerNorm.weight",
    "bert.encoder.layer.*.attention.output.LayerNorm.bias",
    # feed-forward (te.Linear x 2) and post-LN (te.LayerNorm)
    "bert.encoder.layer.*.intermediate.dense.weight",
    "bert.encoder.layer.*.intermediate.dense.bias",
    "bert.encoder.layer.*.output.dense.weight",
    "bert.encoder.layer.*.output.dense.bias",
    "bert.encoder.layer.*.output.LayerNorm.weight",
    "bert.encoder.layer.*.output.LayerNorm.bias",
    # MLM head: transform (te.Linear, te.LayerNorm), output bias, and the decoder (nn.Linear, tied aliases)
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.bias",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
)
HF_TO_TE_KEYS: dict[str, str] = {key: key for key in _HF_KEYS}
TE_TO_HF_KEYS: dict[str, str] = {te_key: hf_key for hf_key, te_key in HF_TO_TE_KEYS.items()}
# Modules whose `_extra_state` TE writes: every te.Linear and te.LayerNorm above ...
TE_EXTRA_STATE_MODULES: tuple[str, ...] = (
    "bert.embeddings.LayerNorm",
    "bert.encoder.layer.*.attention.self.query",
    "bert.encoder.layer.*.attention.self.key",
    "bert.encoder.layer.*.attention.self.value",
    "bert.encoder.layer.*.attention.output.dense",
    "bert.encoder.layer.*.attention.output.LayerNorm",
    "bert.encoder.layer.*.intermediate.dense",
    "bert.encoder.layer.*.output.dense",
    "bert.encoder.layer.*.output.LayerNorm",
    "cls.predictions.transform.dense",
    "cls.predictions.transform.LayerNorm",
)
# ... and the attention core, at `core.dpa._extra_state` or below (TE versions moved the attention's FP8 metadata
# between DotProductAttention and its fused-attention child).
TE_EXTRA_STATE_TREES: tuple[str, ...] = ("bert.encoder.layer.*.attention.self.core",)
EXTRA_STATE_SUFFIX = "._extra_state"
# Tied aliases (HF key -> the key it shares storage with), as in hf.TIED_KEYS.
_TIED: dict[str, str] = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
_LAYER_INDEX = re.compile(r"(?<=^bert\.encoder\.layer\.)\d+(?=\.)")


def _pattern(key: str) -> tuple[str, str | None]:
    """``bert.encoder.layer.3.x`` -> (``bert.encoder.layer.*.x``, ``"3"``); other keys -> (key, None)."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + "*" + key[match.end() :], match.group()


def _apply(pattern: str, index: str | None) -> str:
    return pattern if index is None else pattern.replace("*", index, 1)


def is_te_extra_state_key(key: str) -> bool:
    """Whether ``key`` is an ``_extra_state`` entry that a TE module of this model writes."""
    if not key.endswith(EXTRA_STATE_SUFFIX):
        return False
    module, _ = _pattern(key.removesuffix(EXTRA_STATE_SUFFIX))
    return module in TE_EXTRA_STATE_MODULES or any(
        module == tree or module.startswith(tree + ".") for tree in TE_EXTRA_STATE_TREES
    )


def te_state_dict_to_hf(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A TE model's state dict -> HF ``BertForMaskedLM`` keys (values untouched, TE ``_extra_state`` dropped).

    The result has exactly the keys of ``BertForMaskedLM.state_dict()`` (tied aliases kept when present), so it
    loads with ``strict=True``. Strip wrapper prefixes (``module.``, ``_orig_mod.``) first, as ``hf.to_hf_state_dict``
    does.

    Raises:
        ValueError: For keys that are neither HF BERT keys nor the ``_extra_state`` of a TE module, listed.
    """
    converted: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        pattern, index = _pattern(key)
        if pattern in TE_TO_HF_KEYS:
            converted[_apply(TE_TO_HF_KEYS[pattern], index)] = value
        elif not is_te_extra_state_key(key):
            unknown.append(key)
    if unknown:
        msg = (
            f"{len(unknown)} state-dict keys are neither Hugging Face BertForMaskedLM keys nor the _extra_state of "
            f"a Transformer Engine module of this model: {_preview(unknown)}; is this a Geneformer BERT state dict?"
        )
        raise ValueError(msg)
    return converted


def hf_state_dict_to_te(state_dict: Mapping[str, Any], *, extra_state_keys: Iterable[str] = ()) -> dict[str, Any]:
    """HF ``BertForMaskedLM`` weights -> a state dict that a model built from ``te_primitives()`` loads strictly.

    Missing tied aliases (HF files leave them out) are added from their targets, and each of ``extra_state_keys``
    gets ``None``, which TE's ``set_extra_state`` reads as "no FP8 metadata yet"; pass the model's own ones::

        te_model.load_state_dict(hf_state_dict_to_te(
            tensors, extra_state_keys=[k for k in te_model.state_dict() if k.endswith("._extra_state")]), strict=True)

    Raises:
        ValueError: For keys that are not HF BERT keys, or extra-state keys that no TE module of this model has.
    """
    converted: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        pattern, index = _pattern(key)
        if pattern in HF_TO_TE_KEYS:
            converted[_apply(HF_TO_TE_KEYS[pattern], index)] = value
        else:
            unknown.append(key)
    extra = list(extra_state_keys)
    bad_extra = [key for key in extra if not is_te_extra_state_key(key)]
    if unknown or bad_extra:
        parts = ["cannot convert Hugging Face BERT weights to Transformer Engine names"]
        if unknown:
            parts.append(f"{len(unknown)} keys are not BertForMaskedLM keys: {_preview(unknown)}")
        if bad_extra:
            parts.append(
                f"{len(bad_extra)} extra-state keys belong to no TE module of this model: {_preview(bad_extra)}"
            )
        msg = "; ".join(parts)
        raise ValueError(msg)
    for alias, target in _TIED.items():
        if alias not in converted and target in converted:
            converted[alias] = converted[target]
    converted.update(dict.fromkeys(extra))
    return converted


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


# ---------------------------------------------------------------------------------------------------- FP8
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
