"""Background collation: the next step's micro-batches are built on a worker thread while this step trains.

Batches are a pure function of (step, rank) (:mod:`.sampler`, :mod:`.masking`), so building them ahead changes
nothing but the timing. On CUDA the worker also pins their memory, so the host-to-device copies are asynchronous.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .collate import Batch

BatchSource = Callable[[int, int], tuple[int, list[Batch]]]


def pin_batch(batch: Batch) -> Batch:
    """``batch`` with its tensors in pinned (page-locked) host memory."""
    batch.input_ids = batch.input_ids.pin_memory()
    batch.attention_mask = batch.attention_mask.pin_memory()
    batch.labels = batch.labels.pin_memory()
    return batch


class BatchPrefetcher:
    """``get(step, rank)`` returns ``source(step, rank)`` and starts building ``step + 1`` in the background.

    Args:
        source: ``(step, rank) -> (epoch, micro-batches)``, e.g. ``TrainingData.train_micro_batches``.
        enabled: ``data.prefetch``; False builds every step on the calling thread.
        pin_memory: Pin the batches' memory (for CUDA).
        end_step: First step not to build ahead (``training.max_steps``).
    """

    def __init__(self, source: BatchSource, *, enabled: bool, pin_memory: bool, end_step: int) -> None:
        self.source, self.pin_memory, self.end_step = source, pin_memory, end_step
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gfw-prefetch") if enabled else None
        self._pending: tuple[int, int, Future[tuple[int, list[Batch]]]] | None = None

    def _build(self, step: int, rank: int) -> tuple[int, list[Batch]]:
        epoch, batches = self.source(step, rank)
        if self.pin_memory:
            batches = [pin_batch(b) for b in batches]
        return epoch, batches

    def get(self, step: int, rank: int) -> tuple[int, list[Batch]]:
        """The micro-batches of ``step`` (from the background build when it was for this step)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[:2] == (step, rank):
            result = pending[2].result()  # re-raises an error of the worker here
        else:
            if pending is not None:
                pending[2].cancel()
            result = self._build(step, rank)
        if self._executor is not None and step + 1 < self.end_step:
            self._pending = (step + 1, rank, self._executor.submit(self._build, step + 1, rank))
        return result

    def close(self) -> None:
        """Stop the worker (a build in progress finishes; its result is dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending = None
