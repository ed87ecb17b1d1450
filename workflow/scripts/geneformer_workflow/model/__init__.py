"""Geneformer BERT masked-LM (post-LayerNorm, ReLU, Hugging Face ``BertForMaskedLM`` parameter names).

Modules: ``config`` (``ModelConfig``, ``MODEL_PRESETS``), ``layers`` (one layer from swappable Linear /
LayerNorm / attention primitives), ``packing`` (unpadded "thd" batches), ``bert`` (the model), ``qkv`` (fused-QKV
state-dict keys), ``compile`` (regional ``torch.compile`` of the layers), ``hf`` (export to / import from Hugging
Face directories), ``te`` (Transformer Engine primitives), ``te_names`` (TE <-> HF state-dict keys), ``fp8`` (FP8
recipes and autocast); TE is imported only when used. See docs/model.md.
"""

from __future__ import annotations

from .bert import IGNORE_INDEX, GeneformerForMaskedLM, MaskedLMOutput
from .compile import compile_encoder_layers
from .config import MODEL_PRESETS, ModelConfig, num_parameters
from .fp8 import fp8_autocast_context, resolve_fp8_recipe
from .hf import load_hf_directory, save_hf_directory, save_hf_state_dict, to_hf_state_dict
from .layers import TORCH_PRIMITIVES, Primitives
from .packing import PackedSequences, unpad
from .qkv import fuse_qkv, split_fused_qkv
from .te import require_te, te_primitives
from .te_names import hf_state_dict_to_te, te_state_dict_to_hf

__all__ = [
    "IGNORE_INDEX",
    "MODEL_PRESETS",
    "TORCH_PRIMITIVES",
    "GeneformerForMaskedLM",
    "MaskedLMOutput",
    "ModelConfig",
    "PackedSequences",
    "Primitives",
    "compile_encoder_layers",
    "fp8_autocast_context",
    "fuse_qkv",
    "hf_state_dict_to_te",
    "load_hf_directory",
    "num_parameters",
    "require_te",
    "resolve_fp8_recipe",
    "save_hf_directory",
    "save_hf_state_dict",
    "split_fused_qkv",
    "te_primitives",
    "te_state_dict_to_hf",
    "to_hf_state_dict",
    "unpad",
]
