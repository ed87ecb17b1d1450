"""Which cells make up each global batch, and which micro-batch each rank trains on.

The plan is defined for the *global* batch (``micro_batch_size × world_size × grad_accum``
cells), never per rank, so a run on 1 process with ``grad_accum=2`` sees exactly the same
cells per optimizer step as 2 processes with ``grad_accum=1``. Per epoch:

1. shuffle all training cells: position ``p`` of the epoch holds cell ``π(p)``, where ``π`` is a
   pseudo-random permutation keyed by ``(seed, epoch)`` that is *computed* for any block of
   positions (a Feistel network with cycle walking, :class:`EpochPermutation`), never stored;
2. cut the positions into windows of ``window_batches`` global batches and sort each window's
   cells by length, longest first (Geneformer/Hugging Face length grouping: cells of similar
   length share a batch, so little compute goes to padding);
3. cut each window into global batches of consecutive cells; the positions past the last full
   global batch are dropped (< 1 global batch per epoch), so every rank runs the same number
   of steps;
4. shuffle the global batches inside each window; the window holding the longest cell is
   trained first, starting with that cell's batch (as Hugging Face's ``LengthGroupedSampler``
   puts the longest batch first), so an out-of-memory error shows at once;
5. split a global batch into ``world_size × grad_accum`` micro-batches of consecutive
   (similar-length) cells; micro-batch ``a * world_size + rank`` is the one rank ``rank``
   runs at accumulation step ``a``.

Memory: one window (``window_batches × global batch`` cells) at a time, whatever the corpus size; the
cell lengths are read on demand (a memory-mapped store). This is data order version
:data:`DATA_ORDER_VERSION`; checkpoints record it, and a checkpoint of another order is not resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

DATA_ORDER_VERSION = 2  # 1: a whole-epoch permutation per rank (before the training store); 2: this module
SHUFFLE_STREAM = 3  # RNG streams (masks use 0 and 1, dropout 2)
BATCH_ORDER_STREAM = 4
_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class CellLengths(Protocol):
    """Cell lengths looked up by index: a numpy array, or a store split (read on demand)."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: np.ndarray) -> np.ndarray: ...

    def argmax(self) -> int: ...


@dataclass(frozen=True)
class ClippedLengths:
    """Lengths as trained: at most ``max_length`` (longer cells are truncated)."""

    lengths: CellLengths
    max_length: int

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        return np.minimum(np.asarray(self.lengths[indices], dtype=np.int64), self.max_length)

    def argmax(self) -> int:
        return int(self.lengths.argmax())  # a longest cell is also a longest truncated cell


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijective 64-bit mixer), on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class EpochPermutation:
    """A pseudo-random permutation of ``range(n)`` keyed by ``(seed, epoch)``, evaluated for any positions.

    A balanced Feistel network of ``_ROUNDS`` rounds on ``2k`` bits (``4^k >= n``), whose round function is the
    SplitMix64 mixer of the right half and a round key, is a bijection of ``range(4^k)``; positions mapped past
    ``n`` are mapped again until they land inside (cycle walking), which keeps it a bijection of ``range(n)``
    (``4^k < 4n``, so a few walks at most). Memory: the positions asked for, nothing per cell.

    Example:
        >>> perm = EpochPermutation(10, seed=1, epoch=0)
        >>> sorted(perm(np.arange(10)).tolist()) == list(range(10))
        True
        >>> int(perm.inverse(perm(np.array([7])))[0])
        7
    """

    def __init__(self, n: int, *, seed: int, epoch: int) -> None:
        self.n = int(n)
        self.half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        state = np.random.SeedSequence([seed, SHUFFLE_STREAM, epoch]).generate_state(_ROUNDS, dtype=np.uint64)
        self.keys = [np.uint64(k) for k in state]

    def _rounds(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << shift) | right

    def _walk(self, positions: np.ndarray, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            msg = f"positions outside range({self.n})"
            raise IndexError(msg)
        x = step(x)
        outside = np.flatnonzero(x >= np.uint64(self.n))
        while outside.size:
            x[outside] = step(x[outside])
            outside = outside[x[outside] >= np.uint64(self.n)]
        return x.astype(np.int64)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The cells at ``positions`` of the epoch's order."""
        return self._walk(positions, lambda x: self._rounds(x, self.keys))

    def inverse(self, cells: np.ndarray) -> np.ndarray:
        """The positions of ``cells`` in the epoch's order."""

        def backwards(x: np.ndarray) -> np.ndarray:
            shift = np.uint64(self.half)
            left, right = x >> shift, x & self.mask
            for key in reversed(self.keys):
                left, right = right ^ (_mix(left ^ key) & self.mask), left
            return (left << shift) | right

        return self._walk(cells, backwards)


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


@dataclass(frozen=True)
class EpochPlan:
    """Steps 1–4 of the module docstring for one epoch: global batch ``b`` is computed from its window alone."""

    lengths: CellLengths
    global_batch_size: int
    seed: int
    epoch: int
    window_batches: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "permutation", EpochPermutation(len(self.lengths), seed=self.seed, epoch=self.epoch))
        object.__setattr__(self, "first_window", self._window_of_longest())

    @property
    def n_batches(self) -> int:
        """Global batches in the epoch."""
        return len(self.lengths) // self.global_batch_size

    @property
    def n_windows(self) -> int:
        """Windows in the epoch (the last may hold fewer batches)."""
        return -(-self.n_batches // self.window_batches)

    def window_size(self, window: int) -> int:
        """Global batches in ``window``."""
        return min(self.window_batches, self.n_batches - window * self.window_batches)

    def _window_of_longest(self) -> int:
        """The window holding the longest cell (trained first); 0 when that cell falls in the dropped tail."""
        if self.n_batches == 0:
            return 0
        position = int(self.permutation.inverse(np.array([self.lengths.argmax()]))[0])
        if position >= self.n_batches * self.global_batch_size:
            return 0
        return position // (self.window_batches * self.global_batch_size)

    def locate(self, batch: int) -> tuple[int, int]:
        """``(window, batch within the window)`` of the epoch's global batch ``batch``: the first window, then the rest
        in order (all full but the last, so the arithmetic holds whichever window goes first)."""
        if not 0 <= batch < self.n_batches:
            msg = f"batch {batch} outside the epoch's {self.n_batches} global batches"
            raise IndexError(msg)
        first = self.first_window
        if batch < self.window_size(first):
            return first, batch
        rest, within = divmod(batch - self.window_size(first), self.window_batches)
        return (rest if rest < first else rest + 1), within

    def window(self, window: int) -> np.ndarray:
        """(window_size(window), global_batch_size) int64 cell indices of the window's batches, in training order."""
        size = self.window_batches * self.global_batch_size
        start = window * size
        positions = np.arange(start, start + self.window_size(window) * self.global_batch_size, dtype=np.int64)
        cells = self.permutation(positions)
        cells = cells[np.argsort(-np.asarray(self.lengths[cells]), kind="stable")]
        batches = cells.reshape(-1, self.global_batch_size)
        rng = np.random.default_rng([self.seed, BATCH_ORDER_STREAM, self.epoch, window])
        batches = batches[rng.permutation(batches.shape[0])]
        if window == self.first_window:
            longest = int(np.argmax(np.asarray(self.lengths[batches[:, 0]])))  # rows are sorted longest first
            batches[[0, longest]] = batches[[longest, 0]]
        return batches


def epoch_global_batches(
    lengths: CellLengths, *, global_batch_size: int, seed: int, epoch: int, window_batches: int
) -> np.ndarray:
    """A whole epoch's global batches as cell indices, in training order (tests and benchmarks; O(n) memory).

    Returns:
        (n_batches, global_batch_size) int64 cell indices; each row sorted longest first.

    Example:
        >>> plan = epoch_global_batches(np.array([5, 1, 4, 2, 3, 6]), global_batch_size=2, seed=0, epoch=0,
        ...                             window_batches=3)
        >>> plan.shape, sorted(plan.ravel().tolist())
        ((3, 2), [0, 1, 2, 3, 4, 5])
    """
    plan = EpochPlan(lengths, global_batch_size, seed, epoch, window_batches)
    if plan.n_batches == 0:
        return np.zeros((0, global_batch_size), dtype=np.int64)
    order = [plan.first_window] + [w for w in range(plan.n_windows) if w != plan.first_window]
    return np.concatenate([plan.window(w) for w in order])


def rank_micro_batches(global_batch: np.ndarray, layout: BatchLayout, rank: int) -> list[np.ndarray]:
    """Step 5: the ``grad_accum`` micro-batches (cell indices) that ``rank`` runs for one global batch."""
    micro = global_batch.reshape(layout.grad_accum * layout.world_size, layout.micro_batch_size)
    return [micro[a * layout.world_size + rank] for a in range(layout.grad_accum)]


@dataclass
class GlobalBatchSampler:
    """Maps a step number to its global batch; the data position is just the step.

    Step ``s`` (0-based) is batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``,
    so resuming at a step reproduces the data order exactly with no iterator state to save.
    Holds one window of one epoch at a time.
    """

    lengths: CellLengths
    layout: BatchLayout
    seed: int
    window_batches: int
    _plan: EpochPlan | None = field(default=None, repr=False)
    _window: tuple[int, int, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batches_per_epoch == 0:
            msg = (
                f"the training split has {len(self.lengths)} cells, fewer than one global batch of "
                f"{self.layout.global_batch_size} (data.micro_batch_size × world size × training.grad_accum_steps); "
                "lower data.micro_batch_size or training.grad_accum_steps, or add cells"
            )
            raise ValueError(msg)

    @property
    def batches_per_epoch(self) -> int:
        """Optimizer steps per pass over the training cells."""
        return int(len(self.lengths) // self.layout.global_batch_size)

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch index in epoch)`` of 0-based step ``step``."""
        return divmod(step, self.batches_per_epoch)

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        plan = self._plan  # one read: the prefetch thread may replace it meanwhile
        if plan is None or plan.epoch != epoch:
            plan = EpochPlan(self.lengths, self.layout.global_batch_size, self.seed, epoch, self.window_batches)
            self._plan = plan
        return plan

    def global_batch(self, step: int) -> tuple[int, np.ndarray]:
        """``(epoch, cell indices)`` of 0-based step ``step``."""
        epoch, index = self.position(step)
        plan = self._epoch_plan(epoch)
        window, within = plan.locate(index)
        cached = self._window
        if cached is None or cached[:2] != (epoch, window):
            cached = (epoch, window, plan.window(window))  # one window at a time
            self._window = cached
        return epoch, cached[2][within]

    def micro_batches(self, step: int, rank: int) -> tuple[int, list[np.ndarray]]:
        """``(epoch, micro-batches)`` that ``rank`` runs at 0-based step ``step``."""
        epoch, batch = self.global_batch(step)
        return epoch, rank_micro_batches(batch, self.layout, rank)


def padding_waste(lengths: np.ndarray, micro_batches: list[np.ndarray]) -> float:
    """Fraction of padded token slots when each micro-batch is padded to its longest cell."""
    real = sum(int(lengths[m].sum()) for m in micro_batches)
    padded = sum(int(lengths[m].max()) * m.shape[0] for m in micro_batches)
    return 1.0 - real / padded if padded else 0.0
