"""Packed (unpadded) batches: many cells laid end to end in one row, with ``cu_seqlens`` saying where each starts.

A padded batch of B cells of up to T tokens spends compute on every pad slot; a packed batch holds only real
tokens: ``input_ids`` is (1, T_total) and :class:`PackedSequences` carries the cumulative lengths (the "thd"
layout of flash-attention and Transformer Engine). Every per-token operation (embeddings, Linear, LayerNorm, the
MLM head) is unchanged; position ids restart at 0 for each cell and attention stays inside each cell, so a
packed batch gives the same per-token outputs as the padded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedSequences:
    """Where each of S sequences lies in a packed row of ``T_total = sum(lengths)`` tokens.

    Attributes:
        lengths: Tokens per sequence (host copy: the CPU attention path splits by it, no device sync needed).
        cu_seqlens: (S + 1,) int32 cumulative lengths starting at 0, on the model's device.
        max_seqlen: The longest sequence.
    """

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str | None = None) -> PackedSequences:
        """Describe sequences of ``lengths`` tokens (each > 0), packed in this order."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) <= 0:
            msg = f"packed sequences need at least one sequence and positive lengths, got {list(lengths)[:10]}"
            raise ValueError(msg)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        return cls(lengths=lengths, cu_seqlens=cu_seqlens.to(device), max_seqlen=max(lengths))

    @property
    def total_tokens(self) -> int:
        """T_total."""
        return sum(self.lengths)

    def to(self, device: torch.device | str) -> PackedSequences:
        """The same description with ``cu_seqlens`` on ``device``."""
        return PackedSequences(self.lengths, self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen)

    def position_ids(self) -> torch.Tensor:
        """(T_total,) positions that restart at 0 at each sequence start."""
        device = self.cu_seqlens.device
        lengths_S = torch.tensor(self.lengths, device=device)
        starts_T = torch.repeat_interleave(self.cu_seqlens[:-1].long(), lengths_S, output_size=self.total_tokens)
        return torch.arange(self.total_tokens, device=device) - starts_T


def unpad(
    input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, labels_BT: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, PackedSequences]:
    """Pack a right-padded batch: ``(input_ids (1, T_total), labels (1, T_total) or None, PackedSequences)``.

    Real tokens keep their row-major (cell, position) order, so masked-LM logits come out in the same order as
    from the padded batch. Every row must be right-padded (1s then 0s) and hold at least one token.
    """
    keep_BT = attention_mask_BT.bool()
    lengths_B = keep_BT.sum(1)
    if not bool((keep_BT == (torch.arange(keep_BT.shape[1], device=keep_BT.device) < lengths_B[:, None])).all()):
        msg = "unpad needs right-padded rows (all real tokens before any padding)"
        raise ValueError(msg)
    packed = PackedSequences.from_lengths(lengths_B.tolist(), device=input_ids_BT.device)
    ids_1T = input_ids_BT[keep_BT].unsqueeze(0)
    labels_1T = None if labels_BT is None else labels_BT[keep_BT].unsqueeze(0)
    return ids_1T, labels_1T, packed
