"""Transformer Engine (TE) primitives: Linear / LayerNorm / attention factories for the shared layer code.

``te_primitives()`` returns a ``Primitives`` bundle built on ``transformer_engine.pytorch``, for the same layer code
as the plain PyTorch path (``layers.py``): ``GeneformerForMaskedLM(cfg, te_primitives())``. TE is imported lazily,
only when one of these functions runs, and every import is guarded with ``except Exception``: on a CPU machine
``pip install transformer-engine`` leaves a meta package whose import raises ``RuntimeError``, not ``ImportError``.

Parameter names do not change: ``te.Linear`` and ``te.LayerNorm`` call their parameters ``weight`` / ``bias`` like
``nn.Linear`` / ``nn.LayerNorm``. TE modules add one ``_extra_state`` entry each to the state dict: in TE 2.x a uint8
tensor, ``empty(0)`` until an FP8 forward ran and, with delayed scaling, a pickle of the FP8 scaling metadata after it
(``module/base.py`` ``get_extra_state``; TE 1.x wrote ``io.BytesIO``). ``te_state_dict_to_hf`` drops them and
``hf_state_dict_to_te`` leaves them empty (``te_names.py``), so a TE-trained checkpoint exports to the Hugging Face
names. Training checkpoints never hold them either: the FP8 scaling state is saved as plain tensors
(``train/fp8_state.py``). FP8 recipes and the autocast context are in ``fp8.py``.

Shape legend: B batch, T tokens per sequence (T_total when packed), H hidden, N heads, D head size, R GEMM rows.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SetupError
from .layers import Primitives, checkpoint_layer
from .packing import PackedSequences

log = logging.getLogger(__name__)

# FP8 GEMMs need the row count (tokens) to be a multiple of 16, MXFP8 of 32 (TE's quantization alignment).
FP8_ROW_MULTIPLE = 32


def require_te(feature: str = "model.use_te") -> ModuleType:
    """Import ``transformer_engine.pytorch`` or raise a :class:`SetupError` that names ``feature`` and the fix.

    The import is tried first, so a missing or broken TE is reported as such even on a machine without CUDA.
    """
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # the CPU meta package raises RuntimeError at import, not ImportError
        msg = (
            f"{feature}=true needs CUDA + Transformer Engine, but importing transformer_engine.pytorch failed: "
            f"{err!r}. Install it on a GPU machine (pip install '.[gpu]') or set {feature}=false"
        )
        raise SetupError(msg) from err
    if not torch.cuda.is_available():
        msg = f"{feature}=true needs CUDA + Transformer Engine; this machine has no CUDA device. Set {feature}=false"
        raise SetupError(msg)
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


def _te_device() -> str:
    """Where TE modules put their parameters, as a string: ``"meta"`` inside ``with torch.device("meta")``, else CUDA.

    A string, not a ``torch.device``: TE 2.x defers initialisation only when ``device == "meta"``
    (``module/linear.py`` ~l.2046 and ~l.2242, ``reset_parameters(defer_init=device == "meta")``), a test that is False
    for ``torch.device("meta")``; its ``reset_parameters`` (``module/base.py`` ~l.1820) then materialises every meta
    parameter on the GPU and initialises it, which costs every rank a full copy of the weights before the broadcast.
    """
    default = torch.get_default_device()
    if default.type == "meta":
        return "meta"
    return str(default) if default.type == "cuda" else "cuda"


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
