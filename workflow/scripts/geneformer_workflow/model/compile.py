"""Regional ``torch.compile``: each encoder layer is compiled on its own, in place (``model.compile``).

As torchtitan's ``apply_compile`` (``torchtitan/models/llama3/infra/parallelize.py``) does for its transformer
blocks: the layers share one structure, so one compiled graph serves all of them (compile time does not grow with
depth), and embeddings, the MLM head's data-dependent gather and the loss stay eager. Following torchtitan's order,
layers are compiled *before* ``fully_shard`` (FSDP2 then wraps the compiled layers; its hooks run eagerly) and
activation checkpointing works around the compiled layer (non-reentrant ``torch.utils.checkpoint``).
``nn.Module.compile`` compiles in place, so parameter names (and every checkpoint and export) stay the same.

Shapes: batches differ in cells and tokens, so the batch and token dimensions are marked dynamic before every layer
(``mark_token_dims_dynamic``): one graph for all padded shapes instead of one per length. In a packed batch the
attention splits the row by the host list of cell lengths, which differs in every batch; that function runs
eagerly (``torch.compiler.disable`` in ``layers.packed_attention``) and everything around it is compiled once.
Transformer Engine layers are not compiled (TE's modules and FP8 state are opaque to Dynamo).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .bert import GeneformerForMaskedLM

COMPILE_BACKEND = "inductor"


def compile_encoder_layers(model: GeneformerForMaskedLM, *, backend: str = COMPILE_BACKEND) -> None:
    """Compile every encoder layer of ``model`` in place (call before any FSDP / DDP wrapping).

    Args:
        model: A model built from the PyTorch primitives (``TORCH_PRIMITIVES``, any ``packed_attention``).
        backend: ``torch.compile`` backend; ``"inductor"`` (generated Triton / C++ kernels) for speed, ``"eager"``
            or ``"aot_eager"`` to check tracing and recompilations without code generation.

    Raises:
        ValueError: for Transformer Engine (or other non-PyTorch) layers.
    """
    from .layers import TORCH_PRIMITIVES

    prims = model.bert.prims
    if (prims.linear, prims.layer_norm) != (TORCH_PRIMITIVES.linear, TORCH_PRIMITIVES.layer_norm):
        msg = (
            "model.compile=true compiles the PyTorch layers only; Transformer Engine layers are left out "
            "(their FP8 state is opaque to torch.compile): set model.compile=false or model.use_te=false"
        )
        raise ValueError(msg)
    for layer in model.encoder_layers:
        layer.compile(backend=backend)
    model.bert.encoder.mark_dynamic = True


def mark_token_dims_dynamic(x_BTH: torch.Tensor, mask: Any) -> None:
    """Tell Dynamo that the batch and token dimensions of a layer's inputs vary (no recompile per length).

    ``maybe_mark_dynamic``: a dimension that the graph must specialise (e.g. a packed batch's B = 1) stays static
    instead of raising.
    """
    for dim in (0, 1):
        torch._dynamo.maybe_mark_dynamic(x_BTH, dim)
    if isinstance(mask, torch.Tensor):  # the (B, 1, 1, T) padding mask; a packed batch passes PackedSequences
        for dim in (0, mask.dim() - 1):
            torch._dynamo.maybe_mark_dynamic(mask, dim)
