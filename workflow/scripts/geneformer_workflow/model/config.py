"""Model configuration: the hyper-parameters of a Geneformer BERT and its shape presets.

Geneformer is a standard post-LayerNorm BERT masked-LM (ReLU, learned absolute positions, tied decoder).
``ModelConfig`` holds only what that architecture can vary; options it cannot honour (GELU, relative positions,
an untied decoder, a decoder/cross-attention model) are rejected by ``from_hf_config`` instead of being silently
changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import BertConfig

# Shape-only presets (layers / hidden / heads / FFN). Vocabulary size and maximum length come from the corpus
# (v1: 25,426 tokens x 2,048; v2: 20,275 tokens x 4,096). Sizes from Geneformer (Theodoris et al. 2023, Chen et al.
# 2024); "4b" is about 2.9 B parameters, see docs/model.md.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "sanity": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128},
    "10m": {"num_hidden_layers": 6, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512},
    "106m": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    "4b": {"num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 40, "intermediate_size": 10240},
}

# BertConfig fields whose values this architecture fixes; ``from_hf_config`` raises when a checkpoint differs.
_FIXED_HF_FIELDS: dict[str, Any] = {
    "hidden_act": "relu",
    "position_embedding_type": "absolute",  # gone from transformers 5 BertConfig, present in older config.json
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


# Integer fields that fix the architecture (and the shapes of every weight).
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)

# Fields that choose how the model computes or stores its weights, not what it computes: a Hugging Face config.json
# does not carry them (``to_hf_config`` drops them, ``from_hf_config`` takes them as arguments).
LAYOUT_FIELDS = ("gradient_checkpointing", "fused_qkv", "packed_attention")
# How packed batches are attended (model/layers.py ``packed_attention``): the same result by every kernel.
PACKED_ATTENTION_KERNELS = ("auto", "per_cell", "jagged")


@dataclass(kw_only=True)
class ModelConfig:
    """Hyper-parameters of a Geneformer BERT masked-LM (names as in ``transformers.BertConfig``).

    Attributes:
        vocab_size: Number of token ids (``<pad>``, ``<mask>``, [``<cls>``, ``<eos>``], genes).
        hidden_size: Width H of every layer.
        num_hidden_layers: Number of transformer layers.
        num_attention_heads: Attention heads per layer; must divide ``hidden_size``.
        intermediate_size: Width of the ReLU feed-forward block.
        max_position_embeddings: Longest input, in tokens (learned absolute positions).
        hidden_dropout_prob: Dropout on embeddings and on each residual branch (Geneformer V1: 0.02).
        attention_probs_dropout_prob: Dropout on the attention probabilities (Geneformer V1: 0.02). Any value > 0
            makes PyTorch SDPA leave its fused kernels while training (on CPU 2.8x slower and far more memory,
            see docs/model.md); set 0.0 for speed.
        layer_norm_eps: LayerNorm epsilon.
        initializer_range: Standard deviation of the normal initialisation of weights and embeddings.
        pad_token_id: Id of ``<pad>``; its embedding row starts at zero and gets no gradient.
        type_vocab_size: Rows of the token-type table; only row 0 is used (kept for checkpoint compatibility).
        gradient_checkpointing: Recompute each layer's activations in the backward pass (training only).
        fused_qkv: Compute Q, K and V with one (3H x H) Linear ``attention.self.qkv`` instead of three: one larger
            GEMM per layer. A layout of the weights only: the concatenation ``[query; key; value]`` gives the same
            model, and Hugging Face exports and imports keep the three separate matrices (``model.qkv``).
        packed_attention: Kernel for packed batches (``PACKED_ATTENTION_KERNELS``): ``auto`` (flash varlen on CUDA
            without attention dropout, else one SDPA call per cell), ``per_cell`` or ``jagged`` (one SDPA call on
            nested tensors: a varlen kernel with dropout on CUDA). The same attention; only speed differs.

    Example:
        >>> cfg = ModelConfig(vocab_size=100, **MODEL_PRESETS["sanity"], max_position_embeddings=32)
        >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    vocab_size: int
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    type_vocab_size: int = 2
    gradient_checkpointing: bool = False
    fused_qkv: bool = False
    packed_attention: str = "auto"

    def __post_init__(self) -> None:
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"ModelConfig.{name} must be a positive int, got {value!r}"
                raise ValueError(msg)
        if self.hidden_size % self.num_attention_heads:
            msg = (
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick heads so that hidden_size / heads is an integer"
            )
            raise ValueError(msg)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                msg = f"ModelConfig.{name} must be in [0, 1), got {p!r}"
                raise ValueError(msg)
        if self.packed_attention not in PACKED_ATTENTION_KERNELS:
            kernel = self.packed_attention
            msg = f"ModelConfig.packed_attention must be one of {PACKED_ATTENTION_KERNELS}, got {kernel!r}"
            raise ValueError(msg)
        pad = self.pad_token_id
        if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < self.vocab_size:
            msg = f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size})"
            raise ValueError(msg)

    @property
    def head_dim(self) -> int:
        """Width D of one attention head (``hidden_size // num_attention_heads``)."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> ModelConfig:
        """Build a config from a ``MODEL_PRESETS`` shape plus the remaining fields (``vocab_size``, ...).

        Example:
            >>> ModelConfig.from_preset("10m", vocab_size=25_426).num_hidden_layers
            6
        """
        if name not in MODEL_PRESETS:
            msg = f"Unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}"
            raise ValueError(msg)
        return cls(**{**MODEL_PRESETS[name], **kwargs})

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys raise (a typo must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            msg = f"Unknown ModelConfig keys {unknown}; known keys are {sorted(known)}"
            raise ValueError(msg)
        return cls(**d)

    def to_hf_config(self) -> BertConfig:
        """The equivalent ``transformers.BertConfig`` (ReLU, tied decoder, ``architectures=["BertForMaskedLM"]``).

        ``gradient_checkpointing``, ``fused_qkv`` and ``packed_attention`` (``LAYOUT_FIELDS``) are not part of the
        exported config.
        """
        from transformers import BertConfig

        fields = self.to_dict()
        for name in LAYOUT_FIELDS:
            del fields[name]
        return BertConfig(
            **fields,
            hidden_act="relu",
            is_decoder=False,
            add_cross_attention=False,
            tie_word_embeddings=True,
            architectures=["BertForMaskedLM"],
        )

    @classmethod
    def from_hf_config(
        cls, hf_config: BertConfig, *, gradient_checkpointing: bool = False, fused_qkv: bool = False
    ) -> ModelConfig:
        """Read a ``transformers.BertConfig`` (e.g. a public Geneformer ``config.json``); the ``LAYOUT_FIELDS`` are
        not in it and come from the keyword arguments.

        Raises:
            ValueError: when the config asks for something this architecture does not implement.
        """
        wrong = {
            key: getattr(hf_config, key)
            for key, want in _FIXED_HF_FIELDS.items()
            if getattr(hf_config, key, want) != want
        }
        if wrong:
            msg = (
                f"This BERT config is not a Geneformer-style masked-LM: {wrong}; supported values are "
                f"{ {k: _FIXED_HF_FIELDS[k] for k in wrong} }"
            )
            raise ValueError(msg)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in LAYOUT_FIELDS]
        return cls(
            **{name: getattr(hf_config, name) for name in names},
            gradient_checkpointing=gradient_checkpointing,
            fused_qkv=fused_qkv,
        )


def num_parameters(cfg: ModelConfig) -> int:
    """Number of distinct trainable parameters (the tied decoder counted once), without building the model.

    Example:
        >>> num_parameters(ModelConfig.from_preset("10m", vocab_size=25_426, max_position_embeddings=2048))
        10288722
    """
    h, i, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # q, k, v, out; FFN in, out; 2 LayerNorms
    head = (h * h + h) + 2 * h + cfg.vocab_size  # transform dense, LayerNorm, output bias (decoder weight is tied)
    return embeddings + n_layers * layer + head
