"""One post-LayerNorm BERT layer, built from swappable primitives (Linear, LayerNorm, attention).

The layer structure (post-LN, ReLU, real padding mask) is written once, here. The primitives are passed in as
a ``Primitives`` bundle of factories, so a Transformer Engine variant can later plug in ``te.Linear``,
``te.LayerNorm`` and a ``te.DotProductAttention`` wrapper without touching the structure: the CPU tests cover the
structure and only the primitives differ on GPU. Nothing here imports transformer_engine.

Module and parameter names copy Hugging Face ``modeling_bert.py`` (``attention.self.query``, ``output.LayerNorm``,
...), so state dicts map 1:1 to ``BertForMaskedLM``. Checkpoints depend on the CamelCase ``LayerNorm`` attribute
names: do not rename them to snake_case.

Shape legend: B batch, T tokens per sequence, H hidden size, N attention heads, D head size (H = N * D),
I feed-forward size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .config import ModelConfig
from .packing import PackedSequences

# SDPA backends on CUDA: cuDNN attention is left out on purpose. It builds (and caches) a cuDNN graph for every new
# input shape, about 5 ms of CPU time per call; with variable-length batches almost every step has new shapes, and
# this overhead made a 10m training step 6x slower than its GPU time on an H200 (benchmarks/gpu_check.md).
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def sdpa_backends(tensor: torch.Tensor) -> Iterator[None]:
    """Restrict SDPA to ``CUDA_SDPA_BACKENDS`` for CUDA tensors; PyTorch's default choice elsewhere."""
    if tensor.is_cuda:
        with sdpa_kernel(CUDA_SDPA_BACKENDS):
            yield
    else:
        yield


class SDPAttention(nn.Module):
    """Core attention ``softmax(Q Kᵀ / √D + padding mask) V`` with PyTorch's ``scaled_dot_product_attention``.

    Attention-probability dropout is applied only when ``dropout_p > 0`` and the module is training. With dropout,
    SDPA cannot use its fused kernels: on CPU it falls back to the math path (measured 2.8x slower per step and
    several times the memory for the 10m model at 8 x 2048, see docs/model.md). On GPU the flash / memory-efficient
    kernels support dropout.

    Args:
        num_heads: N.
        head_dim: D.
        dropout_p: Attention-probability dropout while training.
        packed_kernel: How packed batches are attended (``ModelConfig.packed_attention``, :func:`packed_attention`).
    """

    def __init__(self, num_heads: int, head_dim: int, dropout_p: float, packed_kernel: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout_p = dropout_p
        self.packed_kernel = packed_kernel

    @staticmethod
    def prepare_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """Turn the (B, T) 1 = token / 0 = pad mask into SDPA's boolean key mask (B, 1, 1, T), True = attend.

        Computed once per forward and shared by all layers. Only keys are masked: queries at pad positions still
        produce (ignored) outputs, so no row is fully masked unless a sequence has no tokens at all.
        """
        return attention_mask_BT.bool()[:, None, None, :]  # (B, 1, 1, T)

    def forward(
        self,
        query_BTND: torch.Tensor,
        key_BTND: torch.Tensor,
        value_BTND: torch.Tensor,
        mask: torch.Tensor | PackedSequences,
    ) -> torch.Tensor:
        """Attend; inputs in "bshd" layout (B, T, N, D), output (B, T, H).

        ``mask`` is the prepared (B, 1, 1, T) padding mask, or a ``PackedSequences`` for a packed (1, T_total)
        batch, where each sequence attends only to itself.
        """
        batch, seq_len = query_BTND.shape[:2]
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(mask, PackedSequences):
            ctx_1TND = packed_attention(query_BTND, key_BTND, value_BTND, mask, dropout_p, self.packed_kernel)
            return ctx_1TND.reshape(batch, seq_len, self.num_heads * self.head_dim)  # (1, T_total, H)
        q_BNTD, k_BNTD, v_BNTD = (x.transpose(1, 2) for x in (query_BTND, key_BTND, value_BTND))
        with sdpa_backends(q_BNTD):
            ctx_BNTD = F.scaled_dot_product_attention(q_BNTD, k_BNTD, v_BNTD, attn_mask=mask, dropout_p=dropout_p)
        return ctx_BNTD.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)  # (B, T, H)


def _flash_varlen() -> Callable[..., torch.Tensor] | None:
    """PyTorch's flash-attention ``varlen_attn`` (torch >= 2.10 with CUDA), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # older torch, or a build without it
        return None
    return varlen_attn


@torch.compiler.disable  # splits by a host list of lengths that differs per batch: eager under model.compile
def packed_attention(
    q_1TND: torch.Tensor,
    k_1TND: torch.Tensor,
    v_1TND: torch.Tensor,
    packed: PackedSequences,
    dropout_p: float,
    kernel: str = "auto",
) -> torch.Tensor:
    """Block-diagonal attention over packed sequences (T = T_total): (1, T, N, D) -> (1, T, N, D).

    ``kernel`` (``ModelConfig.packed_attention``):

    - ``auto``: on CUDA in bf16/fp16 without dropout one flash-attention ``varlen_attn`` call over ``cu_seqlens``
      ("thd" layout); otherwise (CPU, fp32, attention dropout: ``varlen_attn`` has none) ``per_cell``.
    - ``per_cell``: SDPA once per sequence on exactly its tokens (4-D views: SDPA's fused CPU kernel wants them),
      so no compute is spent on padding, but one kernel launch per cell and layer.
    - ``jagged``: on CUDA one SDPA call on jagged nested tensors (:func:`jagged_attention`), dropout included:
      PyTorch runs its flash / memory-efficient varlen kernels over the offsets, one kernel per layer. On CPU
      ``per_cell`` (PyTorch's CPU jagged SDPA is a per-sequence math loop whose saved tensors non-reentrant
      activation checkpointing cannot inspect).

    Always eager (``torch.compiler.disable``), so a compiled layer (``model.compile``) does not recompile for each
    new set of lengths.
    """
    if kernel == "jagged" and q_1TND.is_cuda:
        return jagged_attention(q_1TND, k_1TND, v_1TND, packed, dropout_p)
    varlen = _flash_varlen() if kernel == "auto" and q_1TND.is_cuda and dropout_p == 0.0 else None
    if varlen is not None and q_1TND.dtype in (torch.bfloat16, torch.float16):
        cu = packed.cu_seqlens
        ctx_TND = varlen(q_1TND[0], k_1TND[0], v_1TND[0], cu, cu, packed.max_seqlen, packed.max_seqlen)
        return ctx_TND.unsqueeze(0)
    outputs = []
    with sdpa_backends(q_1TND):
        pieces = (x.split(packed.lengths, 1) for x in (q_1TND, k_1TND, v_1TND))
        for q_1LND, k_1LND, v_1LND in zip(*pieces, strict=True):
            q_1NLD, k_1NLD, v_1NLD = (x.transpose(1, 2) for x in (q_1LND, k_1LND, v_1LND))
            ctx_1NLD = F.scaled_dot_product_attention(q_1NLD, k_1NLD, v_1NLD, dropout_p=dropout_p)
            outputs.append(ctx_1NLD.transpose(1, 2))
    return torch.cat(outputs, 1)  # (1, T, N, D)


def jagged_attention(
    q_1TND: torch.Tensor, k_1TND: torch.Tensor, v_1TND: torch.Tensor, packed: PackedSequences, dropout_p: float
) -> torch.Tensor:
    """Packed attention as one SDPA call on jagged nested tensors (``torch.nested``, ``layout=torch.jagged``).

    Each (1, T, N, D) input is viewed (no copy) as S sequences of ragged length with ``cu_seqlens`` as offsets and
    transposed to (S, N, j, D). PyTorch's jagged SDPA (``torch/nested/_internal/sdpa.py``,
    ``jagged_scaled_dot_product_attention``) then calls ``aten._flash_attention_forward`` or
    ``_efficient_attention_forward`` with cumulative sequence lengths and ``dropout_p`` on CUDA: the varlen kernel
    with dropout that ``varlen_attn`` lacks. On CPU it takes the math path per sequence: a reference for the
    tests, slower than ``per_cell`` and not usable under activation checkpointing (its strided nested tensors have no
    ``shape`` for ``torch.utils.checkpoint``'s recomputation check), so models use it on CUDA only.
    """
    offsets_S1 = packed.cu_seqlens.to(torch.int64)  # jagged offsets are int64

    def as_jagged(x_1TND: torch.Tensor) -> torch.Tensor:
        nested_SjND = torch.nested.nested_tensor_from_jagged(
            x_1TND[0], offsets=offsets_S1, max_seqlen=packed.max_seqlen, min_seqlen=min(packed.lengths)
        )
        return nested_SjND.transpose(1, 2)  # (S, N, j, D)

    with sdpa_backends(q_1TND), warnings.catch_warnings():
        # The CPU math path converts to the strided nested layout, which warns that it is a prototype.
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
        ctx_SNjD = F.scaled_dot_product_attention(
            as_jagged(q_1TND), as_jagged(k_1TND), as_jagged(v_1TND), dropout_p=dropout_p
        )
    return ctx_SNjD.transpose(1, 2).values().unsqueeze(0)  # (1, T, N, D)


def checkpoint_layer(layer: nn.Module, *args: Any) -> torch.Tensor:
    """Run ``layer(*args)`` and recompute its activations in the backward pass (non-reentrant: works with FSDP2;
    RNG state is restored, so dropout masks are identical in the recomputation)."""
    return torch_checkpoint(layer, *args, use_reentrant=False)


def torch_linear(in_features: int, out_features: int) -> nn.Module:
    """``nn.Linear`` with bias (a TE variant returns ``te.Linear(in_features, out_features, bias=True)``)."""
    return nn.Linear(in_features, out_features)


def torch_layer_norm(size: int, eps: float) -> nn.Module:
    """``nn.LayerNorm`` (a TE variant returns ``te.LayerNorm(size, eps=eps)``)."""
    return nn.LayerNorm(size, eps=eps)


@dataclass(frozen=True)
class Primitives:
    """The building blocks a layer is made of, as factories.

    A replacement must keep the parameter names ``weight`` / ``bias`` (both ``nn`` and Transformer Engine
    modules do) so that state-dict keys stay Hugging Face names; extra state such as TE's FP8 ``_extra_state`` is
    dropped on export.

    Attributes:
        linear: ``(in_features, out_features) -> module`` mapping (..., in) -> (..., out), with bias.
        layer_norm: ``(size, eps) -> module`` normalising the last dimension, with ``weight`` and ``bias``.
        attention: ``(num_heads, head_dim, dropout_p) -> module`` called as
            ``module(query_BTND, key_BTND, value_BTND, mask) -> (B, T, H)``; it must apply its dropout only while
            training, and accept a ``PackedSequences`` as ``mask`` for packed (1, T_total) batches.
        prepare_mask: Converts the (B, T) 1 = token / 0 = pad mask once per forward into what ``attention``
            takes (for SDPA a (B, 1, 1, T) boolean keep-mask; for TE a (B, 1, 1, T) mask with True = masked).
        checkpoint: ``(layer, *args) -> output`` with activation recomputation (``model.gradient_checkpointing``);
            TE's variant also restores its FP8 state for the recomputation.
    """

    linear: Callable[[int, int], nn.Module]
    layer_norm: Callable[[int, float], nn.Module]
    attention: Callable[[int, int, float], nn.Module]
    prepare_mask: Callable[[torch.Tensor], Any]
    checkpoint: Callable[..., torch.Tensor] = checkpoint_layer


TORCH_PRIMITIVES = Primitives(
    linear=torch_linear,
    layer_norm=torch_layer_norm,
    attention=SDPAttention,
    prepare_mask=SDPAttention.prepare_mask,
)


def torch_primitives(packed_attention: str = "auto") -> Primitives:
    """``TORCH_PRIMITIVES`` with packed batches attended by ``packed_attention`` (:func:`packed_attention`)."""
    if packed_attention == "auto":
        return TORCH_PRIMITIVES
    attention = functools.partial(SDPAttention, packed_kernel=packed_attention)
    return dataclasses.replace(TORCH_PRIMITIVES, attention=attention)


class BertSelfAttention(nn.Module):
    """Q, K, V projections and the core attention (HF ``attention.self``).

    With ``cfg.fused_qkv`` the three projections are one Linear ``qkv`` (H -> 3H) whose weight is the concatenation
    ``[query; key; value]`` along the output dimension: one GEMM instead of three. ``model.qkv`` converts the
    state-dict keys between the two layouts.
    """

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.fused_qkv = cfg.fused_qkv
        if cfg.fused_qkv:
            self.qkv = prims.linear(cfg.hidden_size, 3 * cfg.hidden_size)
        else:
            self.query = prims.linear(cfg.hidden_size, cfg.hidden_size)
            self.key = prims.linear(cfg.hidden_size, cfg.hidden_size)
            self.value = prims.linear(cfg.hidden_size, cfg.hidden_size)
        self.core = prims.attention(cfg.num_attention_heads, cfg.head_dim, cfg.attention_probs_dropout_prob)

    def forward(self, x_BTH: torch.Tensor, mask: Any) -> torch.Tensor:
        """(B, T, H) -> attention context (B, T, H)."""
        batch, seq_len, _ = x_BTH.shape
        if self.fused_qkv:
            qkv_BT3ND = self.qkv(x_BTH).view(batch, seq_len, 3, self.num_heads, self.head_dim)
            q_BTND, k_BTND, v_BTND = qkv_BT3ND.unbind(2)
            return self.core(q_BTND, k_BTND, v_BTND, mask)  # (B, T, H)
        heads_BTND = (batch, seq_len, self.num_heads, self.head_dim)
        q_BTND = self.query(x_BTH).view(heads_BTND)
        k_BTND = self.key(x_BTH).view(heads_BTND)
        v_BTND = self.value(x_BTH).view(heads_BTND)
        return self.core(q_BTND, k_BTND, v_BTND, mask)  # (B, T, H)


class BertSelfOutput(nn.Module):
    """Attention output projection, dropout, residual add, then LayerNorm (post-LN; HF ``attention.output``)."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.dense = prims.linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = prims.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)  # CamelCase: checkpoint key name
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ctx_BTH: torch.Tensor, residual_BTH: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(ctx_BTH)) + residual_BTH)  # (B, T, H)


class BertAttention(nn.Module):
    """Self-attention block: ``LayerNorm(x + Dropout(Wo · Attn(x)))`` (HF ``attention``)."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, prims)  # the HF attribute name really is `self`
        self.output = BertSelfOutput(cfg, prims)

    def forward(self, x_BTH: torch.Tensor, mask: Any) -> torch.Tensor:
        return self.output(self.self(x_BTH, mask), x_BTH)  # (B, T, H)


class BertIntermediate(nn.Module):
    """Feed-forward up-projection and ReLU (HF ``intermediate``; Geneformer uses ``hidden_act="relu"``)."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.dense = prims.linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x_BTH))  # (B, T, I)


class BertOutput(nn.Module):
    """Feed-forward down-projection, dropout, residual add, then LayerNorm (post-LN; HF ``output``)."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.dense = prims.linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = prims.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)  # CamelCase: checkpoint key name
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h_BTI: torch.Tensor, residual_BTH: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h_BTI)) + residual_BTH)  # (B, T, H)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer layer, the FSDP wrapping unit::

        x ─► self-attention ─► dropout ─► (+x) ─► LayerNorm ─► a
        a ─► Linear(H→I) ─► ReLU ─► Linear(I→H) ─► dropout ─► (+a) ─► LayerNorm ─► out

    Args:
        cfg: Model hyper-parameters.
        prims: The Linear / LayerNorm / attention factories (``TORCH_PRIMITIVES`` by default).
    """

    def __init__(self, cfg: ModelConfig, prims: Primitives = TORCH_PRIMITIVES) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, prims)
        self.intermediate = BertIntermediate(cfg, prims)
        self.output = BertOutput(cfg, prims)

    def forward(self, x_BTH: torch.Tensor, mask: Any) -> torch.Tensor:
        """(B, T, H) and the prepared padding mask -> (B, T, H)."""
        a_BTH = self.attention(x_BTH, mask)
        return self.output(self.intermediate(a_BTH), a_BTH)  # (B, T, H)
