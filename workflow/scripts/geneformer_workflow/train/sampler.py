"""Which cells make up each global batch, and which micro-batch each rank trains on.

The plan is defined for the *global* batch (``micro_batch_size × world_size × grad_accum``
cells), never per rank, so a run on 1 process with ``grad_accum=2`` sees exactly the same
cells per optimizer step as 2 processes with ``grad_accum=1``. Per epoch:

1. shuffle all training cells with a generator seeded by ``(seed, epoch)``;
2. cut the shuffled order into windows of ``window_batches`` global batches and sort each
   window by length, longest first (Geneformer/Hugging Face length grouping: cells of similar
   length share a batch, so little compute goes to padding);
3. cut each window into global batches of consecutive cells; the tail that does not fill a
   global batch is dropped (< 1 global batch per epoch), so every rank runs the same number
   of steps;
4. shuffle the global batches (the one with the longest cell goes first, as in Hugging Face's
   ``LengthGroupedSampler``, so an out-of-memory error shows at once);
5. split a global batch into ``world_size × grad_accum`` micro-batches of consecutive
   (similar-length) cells; micro-batch ``a * world_size + rank`` is the one rank ``rank``
   runs at accumulation step ``a``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is split across ranks and accumulation steps."""

    micro_batch_size: int
    world_size: int
    grad_accum: int

    @property
    def global_batch_size(self) -> int:
        """Cells per optimizer step over all ranks."""
        return self.micro_batch_size * self.world_size * self.grad_accum


def epoch_global_batches(
    lengths: np.ndarray, *, global_batch_size: int, seed: int, epoch: int, window_batches: int
) -> np.ndarray:
    """Steps 1–4 of the module docstring: the epoch's global batches as cell indices.

    Args:
        lengths: (n_cells,) cell lengths.
        global_batch_size: Cells per global batch.
        seed: ``seed``.
        epoch: Epoch number (0-based).
        window_batches: Length-grouping window in global batches (1 = group within a batch only).

    Returns:
        (n_batches, global_batch_size) int64 cell indices; each row sorted longest first.

    Example:
        >>> plan = epoch_global_batches(np.array([5, 1, 4, 2, 3, 6]), global_batch_size=2, seed=0, epoch=0,
        ...                             window_batches=3)
        >>> plan.shape, sorted(plan.ravel().tolist())
        ((3, 2), [0, 1, 2, 3, 4, 5])
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(lengths.shape[0])
    n_batches = order.shape[0] // global_batch_size
    window = window_batches * global_batch_size
    grouped = []
    for start in range(0, n_batches * global_batch_size, window):
        chunk = order[start : min(start + window, n_batches * global_batch_size)]
        grouped.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    if not grouped:
        return np.zeros((0, global_batch_size), dtype=np.int64)
    batches = np.concatenate(grouped).reshape(n_batches, global_batch_size)
    batches = batches[rng.permutation(n_batches)]
    longest = int(np.argmax(lengths[batches[:, 0]]))
    batches[[0, longest]] = batches[[longest, 0]]
    return batches.astype(np.int64)


def rank_micro_batches(global_batch: np.ndarray, layout: BatchLayout, rank: int) -> list[np.ndarray]:
    """Step 5: the ``grad_accum`` micro-batches (cell indices) that ``rank`` runs for one global batch."""
    micro = global_batch.reshape(layout.grad_accum * layout.world_size, layout.micro_batch_size)
    return [micro[a * layout.world_size + rank] for a in range(layout.grad_accum)]


@dataclass
class GlobalBatchSampler:
    """Maps a step number to its global batch; the data position is just the step.

    Step ``s`` (0-based) is batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``,
    so resuming at a step reproduces the data order exactly with no iterator state to save.
    """

    lengths: np.ndarray
    layout: BatchLayout
    seed: int
    window_batches: int
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batches_per_epoch == 0:
            msg = (
                f"the training split has {self.lengths.shape[0]} cells, fewer than one global batch of "
                f"{self.layout.global_batch_size} (data.micro_batch_size × world size × training.grad_accum_steps); "
                "lower data.micro_batch_size or training.grad_accum_steps, or add cells"
            )
            raise ValueError(msg)

    @property
    def batches_per_epoch(self) -> int:
        """Optimizer steps per pass over the training cells."""
        return int(self.lengths.shape[0] // self.layout.global_batch_size)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index in epoch)`` of 0-based step ``step``."""
        return divmod(step, self.batches_per_epoch)

    def global_batch(self, step: int) -> tuple[int, np.ndarray]:
        """``(epoch, cell indices)`` of 0-based step ``step``."""
        epoch, index = self.position(step)
        if epoch not in self._cache:
            self._cache.clear()  # one epoch's plan at a time: (n_cells,) int64
            self._cache[epoch] = epoch_global_batches(
                self.lengths,
                global_batch_size=self.layout.global_batch_size,
                seed=self.seed,
                epoch=epoch,
                window_batches=self.window_batches,
            )
        return epoch, self._cache[epoch][index]

    def micro_batches(self, step: int, rank: int) -> tuple[int, list[np.ndarray]]:
        """``(epoch, micro-batches)`` that ``rank`` runs at 0-based step ``step``."""
        epoch, batch = self.global_batch(step)
        return epoch, rank_micro_batches(batch, self.layout, rank)


def padding_waste(lengths: np.ndarray, micro_batches: list[np.ndarray]) -> float:
    """Fraction of padded token slots when each micro-batch is padded to its longest cell."""
    real = sum(int(lengths[m].sum()) for m in micro_batches)
    padded = sum(int(lengths[m].max()) * m.shape[0] for m in micro_batches)
    return 1.0 - real / padded if padded else 0.0
