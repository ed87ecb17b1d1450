"""Geneformer BERT masked-LM: embeddings, encoder and MLM head, with Hugging Face ``BertForMaskedLM`` names.

Same function as ``transformers.BertForMaskedLM`` with ``hidden_act="relu"``: learned absolute positions,
token type 0 everywhere, post-LayerNorm layers, MLM head dense → ReLU → LayerNorm → decoder tied to the word
embeddings (+ output bias). Two deliberate differences, neither of which changes the maths:

* with labels, the MLM head runs only at the masked positions (about 15 % of tokens; 1.6x cheaper per step than
  the full head on the 10m model), so ``logits`` is (M, V) instead of (B, T, V);
* the loss is the mean over masked positions in float32, and 0.0 (not NaN) when a batch has none.

Architecture only: no training logic here. Shape legend: B batch, T tokens, H hidden, V vocabulary,
M masked positions in the batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .compile import mark_token_dims_dynamic
from .config import ModelConfig
from .layers import TORCH_PRIMITIVES, BertLayer, Primitives, torch_primitives
from .packing import PackedSequences

IGNORE_INDEX = -100  # label of positions that do not count in the loss (PyTorch's cross_entropy default)


class MaskedLMOutput(NamedTuple):
    """What ``GeneformerForMaskedLM.forward`` returns.

    Attributes:
        loss: Mean cross-entropy over the masked positions (float32 scalar); None without labels.
        logits: (M, V) at the masked positions, in row-major (batch, position) order, when labels are given;
            (B, T, V) otherwise.
        num_masked: M, the number of positions with ``labels != -100`` (None without labels). Use it to weight
            per-rank losses when averaging across data-parallel ranks.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    num_masked: int | None


class BertEmbeddings(nn.Module):
    """word + token type 0 + learned absolute position, then LayerNorm and dropout (HF ``bert.embeddings``)."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # Only row 0 is ever used; the table exists because BERT checkpoints carry it.
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        # CamelCase `LayerNorm` as in HF: checkpoints depend on this name.
        self.LayerNorm = prims.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids_BT: torch.Tensor, positions_T: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, H); ``positions_T`` (T,) defaults to 0..T-1 (packed rows restart per cell)."""
        if positions_T is None:
            positions_T = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device)
        # Same summation order as HF: (word + token type) + position.
        x_BTH = self.word_embeddings(input_ids_BT) + self.token_type_embeddings.weight[0]
        x_BTH = x_BTH + self.position_embeddings(positions_T)  # (T, H) broadcast over B
        return self.dropout(self.LayerNorm(x_BTH))  # (B, T, H)


class BertEncoder(nn.Module):
    """The stack of layers (HF ``bert.encoder``), with optional per-layer activation checkpointing."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, prims) for _ in range(cfg.num_hidden_layers))
        self.checkpoint = prims.checkpoint
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.mark_dynamic = False  # set by compile.compile_encoder_layers: the layers are compiled

    def forward(
        self, x_BTH: torch.Tensor, mask: Any, *, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        hidden_states = [x_BTH] if output_hidden_states else None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layer:
            if self.mark_dynamic:
                mark_token_dims_dynamic(x_BTH, mask)
            if recompute:
                x_BTH = self.checkpoint(layer, x_BTH, mask)
            else:
                x_BTH = layer(x_BTH, mask)
            if hidden_states is not None:
                hidden_states.append(x_BTH)
        return x_BTH, (tuple(hidden_states) if hidden_states is not None else None)


class BertModel(nn.Module):
    """Embeddings + encoder, no pooler (as ``BertForMaskedLM``'s ``bert`` submodule)."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.prims = prims
        self.embeddings = BertEmbeddings(cfg, prims)
        self.encoder = BertEncoder(cfg, prims)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor | None,
        *,
        packed: PackedSequences | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Padded (B, T) ids with their mask, or a packed (1, T_total) row with ``packed`` -> hidden states."""
        if packed is not None:
            x_BTH = self.embeddings(input_ids_BT, packed.position_ids())
            return self.encoder(x_BTH, packed, output_hidden_states=output_hidden_states)
        mask = self.prims.prepare_mask(attention_mask_BT)  # once for all layers
        return self.encoder(self.embeddings(input_ids_BT), mask, output_hidden_states=output_hidden_states)


class BertPredictionHeadTransform(nn.Module):
    """dense → ReLU → LayerNorm (HF ``cls.predictions.transform``)."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.dense = prims.linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = prims.layer_norm(cfg.hidden_size, cfg.layer_norm_eps)  # CamelCase: checkpoint key name

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.relu(self.dense(x_NH)))


class BertLMPredictionHead(nn.Module):
    """transform, then the decoder tied to the word embeddings plus an output-only bias (HF ``cls.predictions``).

    ``decoder.weight`` is the word-embedding matrix and ``decoder.bias`` is ``bias`` (tied by
    ``GeneformerForMaskedLM.tie_weights``), exactly as in transformers, so the state-dict keys are the same.
    """

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg, prims)
        # Stays nn.Linear for every primitive set: its weight is the (tied) embedding table.
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x_NH))  # (..., V)


class BertOnlyMLMHead(nn.Module):
    """HF ``cls``: holds ``predictions``."""

    def __init__(self, cfg: ModelConfig, prims: Primitives) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, prims)

    def forward(self, x_NH: torch.Tensor) -> torch.Tensor:
        return self.predictions(x_NH)


class GeneformerForMaskedLM(nn.Module):
    """Geneformer BERT masked-LM; parameter names identical to ``transformers.BertForMaskedLM``.

    Args:
        cfg: Model hyper-parameters.
        prims: Linear / LayerNorm / attention factories; ``TORCH_PRIMITIVES`` (plain PyTorch + SDPA) by default,
            its attention with ``cfg.packed_attention``.

    Example:
        >>> from geneformer_workflow.model import ModelConfig, GeneformerForMaskedLM
        >>> cfg = ModelConfig.from_preset("sanity", vocab_size=20, max_position_embeddings=8)
        >>> model = GeneformerForMaskedLM(cfg)
        >>> ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
        >>> mask = (ids != 0).long()
        >>> labels = torch.full_like(ids, -100)
        >>> labels[0, 1] = 6
        >>> out = model(ids, mask, labels=labels)
        >>> tuple(out.logits.shape), out.num_masked, out.loss.dtype
        ((1, 20), 1, torch.float32)
    """

    def __init__(self, cfg: ModelConfig, prims: Primitives = TORCH_PRIMITIVES) -> None:
        super().__init__()
        self.config = cfg
        if prims is TORCH_PRIMITIVES:
            prims = torch_primitives(cfg.packed_attention)
        self.bert = BertModel(cfg, prims)
        self.cls = BertOnlyMLMHead(cfg, prims)
        self._init_weights()

    @property
    def encoder_layers(self) -> nn.ModuleList:
        """The transformer layers, i.e. the FSDP / activation-checkpointing wrapping units."""
        return self.bert.encoder.layer

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Switch per-layer activation checkpointing (active only in training mode with grad enabled)."""
        self.config.gradient_checkpointing = enabled
        self.bert.encoder.gradient_checkpointing = enabled

    def tie_weights(self) -> None:
        """Make the decoder share the word-embedding matrix and the output bias (as HF does).

        Call again after anything that re-creates parameters, e.g. ``to_empty`` from the meta device
        (``init_weights`` does it for you).
        """
        predictions = self.cls.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    def init_weights(self) -> None:
        """Re-initialise all weights, e.g. after ``model.to_empty(device=...)`` of a meta-device model."""
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """All initialisation: Linear and Embedding weights ~ N(0, initializer_range), biases 0, LayerNorm 1 / 0,
        padding embedding row 0, decoder tied to the word embeddings. As ``BertPreTrainedModel._init_weights``.

        Modules are recognised by role, not by class, so Transformer Engine primitives are covered too.
        """
        self.tie_weights()
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if module is self.cls.predictions.decoder:
                continue  # tied: initialised as the word embeddings and the output bias
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if not isinstance(weight, torch.Tensor):
                continue
            if name.endswith("LayerNorm"):
                weight.fill_(1.0)
            else:  # Linear-like (2-D) or Embedding
                weight.normal_(mean=0.0, std=std)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
        self.cls.predictions.bias.zero_()
        self.bert.embeddings.word_embeddings.weight[self.config.pad_token_id].zero_()

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        *,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Encoder output, e.g. for cell embeddings.

        Args:
            input_ids: (B, T) token ids, or (1, T_total) packed cells with ``packed``.
            attention_mask: (B, T), 1 = token, 0 = padding; None = no padding (ignored when packed).
            output_hidden_states: Also return the embeddings output and every layer's output.
            packed: Where each cell lies in a packed row (see ``model.packing``); None for a padded batch.

        Returns:
            The last hidden state (B, T, H); with ``output_hidden_states`` the pair
            ``(last, (embeddings, layer_1, ..., layer_L))``, indexed as HF's ``hidden_states``.
        """
        self._check_inputs(input_ids, attention_mask, packed)
        if attention_mask is None and packed is None:
            attention_mask = torch.ones_like(input_ids)
        last_BTH, hidden_states = self.bert(
            input_ids, attention_mask, packed=packed, output_hidden_states=output_hidden_states
        )
        if output_hidden_states:
            return last_BTH, hidden_states
        return last_BTH

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        packed: PackedSequences | None = None,
    ) -> MaskedLMOutput:
        """Masked-LM forward pass.

        Args:
            input_ids: (B, T) token ids, or (1, T_total) packed cells with ``packed``.
            attention_mask: (B, T), 1 = token, 0 = padding; None = no padding (ignored when packed).
            labels: Same shape as ``input_ids``: target ids, -100 where the position does not count. When given,
                the head runs only at the M positions with a label (this needs the count M on the host: one
                device sync).
            packed: Where each cell lies in a packed row (``model.packing.unpad`` packs a padded batch); the
                per-token results equal the padded batch's.

        Returns:
            ``MaskedLMOutput(loss, logits, num_masked)``; see its docstring for shapes.
        """
        hidden_BTH = self.encode(input_ids, attention_mask, packed=packed)
        if labels is None:
            return MaskedLMOutput(loss=None, logits=self.cls(hidden_BTH), num_masked=None)  # (B, T, V)
        if labels.shape != input_ids.shape:
            msg = f"labels shape {tuple(labels.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
            raise ValueError(msg)
        labels_BT = labels.reshape(-1)  # (B*T,)
        index_M = (labels_BT != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
        hidden_MH = hidden_BTH.reshape(-1, hidden_BTH.shape[-1]).index_select(0, index_M)
        logits_MV = self.cls(hidden_MH)
        targets_M = labels_BT.index_select(0, index_M)
        num_masked = index_M.numel()
        # Sum / count instead of mean: same value, but 0.0 rather than NaN when nothing is masked, and the graph
        # still reaches the head's parameters (keeps DDP / FSDP gradient reductions in step across ranks).
        loss = F.cross_entropy(logits_MV.float(), targets_M, reduction="sum") / max(num_masked, 1)
        return MaskedLMOutput(loss=loss, logits=logits_MV, num_masked=num_masked)

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, packed: PackedSequences | None
    ) -> None:
        if input_ids.dim() != 2:
            msg = f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}"
            raise ValueError(msg)
        if packed is not None and (input_ids.shape[0] != 1 or input_ids.shape[1] != packed.total_tokens):
            msg = (
                f"a packed batch must be one row of sum(lengths) = {packed.total_tokens} tokens, "
                f"got input_ids of shape {tuple(input_ids.shape)}"
            )
            raise ValueError(msg)
        longest = packed.max_seqlen if packed is not None else input_ids.shape[1]
        if longest > self.config.max_position_embeddings:
            msg = (
                f"Sequences of {longest} tokens exceed max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate the corpus or build a larger model"
            )
            raise ValueError(msg)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            msg = (
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
            raise ValueError(msg)
