"""Cells → one masked micro-batch of tensors: padded (B, T), or packed into one row (1, T_total)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.packing import PackedSequences
from .masking import IGNORE_INDEX, MaskingConfig, cell_rng, mask_tokens


@dataclass
class Batch:
    """One micro-batch.

    Attributes:
        input_ids: (B, T) int64, masked tokens, right-padded with ``<pad>``; packed: (1, T_total), the cells end
            to end, then ``<pad>`` up to a multiple of ``pad_to_multiple_of``.
        attention_mask: (B, T) int64, 1 for real tokens (packed: 1 for every cell token, 0 for the pad tail).
        labels: Same shape, original ids where masked, ``IGNORE_INDEX`` elsewhere.
        n_tokens: Real (unpadded) tokens in the batch.
        n_masked: Tokens that count in the loss.
        sum_sq_lengths: Sum over cells of (real length)², for the attention FLOPs of the MFU metric.
        packed: Where each cell lies in the packed row (the pad tail is one more sequence of its own, so no cell
            attends to it); None for a padded batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_tokens: int
    n_masked: int
    sum_sq_lengths: int = 0
    packed: PackedSequences | None = None

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
            packed=None if self.packed is None else self.packed.to(device),
        )


@dataclass(frozen=True)
class Collator:
    """Truncates, masks and pads cells.

    Attributes:
        masking: Masking probabilities and ids.
        pad_id: ``<pad>`` id.
        eos_id: ``<eos>`` id or None; a truncated cell that ended with ``<eos>`` keeps it as its last token.
        max_length: ``data.max_length``; longer cells keep their first (highest-ranked) tokens.
        pad_to_multiple_of: Round the padded length up to this (8 suits tensor cores, 16 FP8 GEMMs); packed
            batches round their total length.
        seed: ``seed``; with stream, epoch and cell index it keys each cell's mask.
        pack: ``data.packing``: lay the cells end to end in one row instead of padding each to the longest.
    """

    masking: MaskingConfig
    pad_id: int
    eos_id: int | None
    max_length: int
    pad_to_multiple_of: int
    seed: int
    pack: bool = False

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
        return self._packed(pairs) if self.pack else self._padded(pairs)

    def _round_up(self, n_tokens: int) -> int:
        return -(-n_tokens // self.pad_to_multiple_of) * self.pad_to_multiple_of

    def _padded(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Batch:
        """(B, T): every cell right-padded to the longest, rounded up."""
        width = self._round_up(max(p[0].shape[0] for p in pairs))
        input_ids = np.full((len(pairs), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(pairs), width), IGNORE_INDEX, dtype=np.int64)
        attention = np.zeros((len(pairs), width), dtype=np.int64)
        for row, (inputs, targets) in enumerate(pairs):
            input_ids[row, : inputs.shape[0]] = inputs
            labels[row, : targets.shape[0]] = targets
            attention[row, : inputs.shape[0]] = 1
        return self._batch(input_ids, attention, labels, pairs, packed=None)

    def _packed(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Batch:
        """(1, T_total): the cells end to end, the total rounded up with a pad tail (its own attention block)."""
        lengths = [int(p[0].shape[0]) for p in pairs]
        total = sum(lengths)
        width = self._round_up(total)
        input_ids = np.full((1, width), self.pad_id, dtype=np.int64)
        labels = np.full((1, width), IGNORE_INDEX, dtype=np.int64)
        attention = np.zeros((1, width), dtype=np.int64)
        input_ids[0, :total] = np.concatenate([p[0] for p in pairs])
        labels[0, :total] = np.concatenate([p[1] for p in pairs])
        attention[0, :total] = 1
        blocks = lengths + ([width - total] if width > total else [])
        return self._batch(input_ids, attention, labels, pairs, packed=PackedSequences.from_lengths(blocks))

    @staticmethod
    def _batch(
        input_ids: np.ndarray,
        attention: np.ndarray,
        labels: np.ndarray,
        pairs: list[tuple[np.ndarray, np.ndarray]],
        packed: PackedSequences | None,
    ) -> Batch:
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention),
            labels=torch.from_numpy(labels),
            n_tokens=int(attention.sum()),
            n_masked=int((labels != IGNORE_INDEX).sum()),
            sum_sq_lengths=sum(int(p[0].shape[0]) ** 2 for p in pairs),
            packed=packed,
        )
