"""Cells → one padded, masked micro-batch of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .masking import IGNORE_INDEX, MaskingConfig, cell_rng, mask_tokens


@dataclass
class Batch:
    """One micro-batch.

    Attributes:
        input_ids: (B, T) int64, masked tokens, right-padded with ``<pad>``.
        attention_mask: (B, T) int64, 1 for real tokens.
        labels: (B, T) int64, original ids where masked, ``IGNORE_INDEX`` elsewhere.
        n_tokens: Real (unpadded) tokens in the batch.
        n_masked: Tokens that count in the loss.
        sum_sq_lengths: Sum over cells of (real length)², for the attention FLOPs of the MFU metric.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_tokens: int
    n_masked: int
    sum_sq_lengths: int = 0

    @property
    def n_padded_tokens(self) -> int:
        """Token slots including padding (B × T)."""
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> Batch:
        """Copy the tensors to ``device``."""
        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            n_tokens=self.n_tokens,
            n_masked=self.n_masked,
            sum_sq_lengths=self.sum_sq_lengths,
        )


@dataclass(frozen=True)
class Collator:
    """Truncates, masks and pads cells.

    Attributes:
        masking: Masking probabilities and ids.
        pad_id: ``<pad>`` id.
        eos_id: ``<eos>`` id or None; a truncated cell that ended with ``<eos>`` keeps it as its last token.
        max_length: ``data.max_length``; longer cells keep their first (highest-ranked) tokens.
        pad_to_multiple_of: Round the padded length up to this (8 suits tensor cores, 16 FP8 GEMMs).
        seed: ``seed``; with stream, epoch and cell index it keys each cell's mask.
    """

    masking: MaskingConfig
    pad_id: int
    eos_id: int | None
    max_length: int
    pad_to_multiple_of: int
    seed: int

    def truncate(self, ids: np.ndarray) -> np.ndarray:
        """Keep the first ``max_length`` tokens (and a final ``<eos>``)."""
        if ids.shape[0] <= self.max_length:
            return ids
        if self.eos_id is not None and int(ids[-1]) == self.eos_id:
            return np.concatenate([ids[: self.max_length - 1], ids[-1:]])
        return ids[: self.max_length]

    def __call__(self, cells: list[np.ndarray], cell_indices: np.ndarray, *, stream: int, epoch: int) -> Batch:
        """Build the micro-batch of ``cells`` (token arrays) whose corpus indices are ``cell_indices``."""
        pairs = [
            mask_tokens(self.truncate(np.asarray(ids)), cell_rng(self.seed, stream, epoch, int(idx)), self.masking)
            for ids, idx in zip(cells, cell_indices, strict=True)
        ]
        longest = max(p[0].shape[0] for p in pairs)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(pairs), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(pairs), width), IGNORE_INDEX, dtype=np.int64)
        attention = np.zeros((len(pairs), width), dtype=np.int64)
        for row, (inputs, targets) in enumerate(pairs):
            input_ids[row, : inputs.shape[0]] = inputs
            labels[row, : targets.shape[0]] = targets
            attention[row, : inputs.shape[0]] = 1
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention),
            labels=torch.from_numpy(labels),
            n_tokens=int(attention.sum()),
            n_masked=int((labels != IGNORE_INDEX).sum()),
            sum_sq_lengths=sum(int(p[0].shape[0]) ** 2 for p in pairs),
        )
