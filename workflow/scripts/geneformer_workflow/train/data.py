"""The training data pipeline, from parquet files to masked micro-batches.

1. Open the training store (``data.store``: built by the workflow or ``gfw store build``, see
   :mod:`geneformer_workflow.tokenize.store`), or build one from ``data.corpus`` parquet files under
   ``data.cache_dir`` first (:mod:`.corpus`; rank 0 writes it, other nodes that cannot see it write their own).
2. Plan each epoch's global batches with a seeded shuffle and length grouping, one window at a
   time, and split them into per-rank micro-batches (:mod:`.sampler`); step ``s`` always maps to the same cells.
3. Truncate, mask (per-cell RNG, :mod:`.masking`) and pad or pack each micro-batch (:mod:`.collate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenize.store import SplitValues, StoreSplit, TrainingStore, open_store
from .collate import Batch, Collator
from .corpus import build_cache, resolve_corpus_files
from .distributed import Runtime, barrier
from .masking import TRAIN_STREAM, VALIDATION_STREAM, MaskingConfig
from .sampler import BatchLayout, ClippedLengths, GlobalBatchSampler
from .vocab import Vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    """The ``data`` config block, typed."""

    store: str | None
    corpus: tuple[str, ...]
    cache_dir: str
    train_split: str
    validation_split: str
    max_length: int
    micro_batch_size: int
    eval_micro_batch_size: int
    max_validation_cells: int
    window_batches: int
    pad_to_multiple_of: int
    mlm_probability: float
    mask_replace_prob: float
    random_replace_prob: float
    packing: bool = False


def split_values(settings: DataSettings) -> SplitValues:
    """The ``split`` column values of the two splits."""
    return SplitValues(train=settings.train_split, validation=settings.validation_split)


def prepare_store(settings: DataSettings, runtime: Runtime, vocab: Vocab) -> Path:
    """Step 1: the store to open: ``data.store`` as given, or one built from ``data.corpus`` under ``data.cache_dir``.

    A store built here is built by rank 0 first, then by any node that cannot see it (a no-op on a shared
    directory); the workflow's store is built by its own CPU jobs, so no rank waits for it.
    """
    if settings.store:
        return Path(settings.store)
    files = resolve_corpus_files(list(settings.corpus))
    splits = split_values(settings).as_dict()
    cache_root = Path(settings.cache_dir)
    build = {"vocab_size": vocab.size, "token_dictionary_sha256": vocab.sha256}
    if runtime.dist.is_main:
        build_cache(files, cache_root, splits, **build)
    barrier(runtime)
    if not runtime.dist.is_main and runtime.dist.local_rank == 0:
        build_cache(files, cache_root, splits, **build)
    barrier(runtime)
    return build_cache(files, cache_root, splits, **build)  # all ranks: returns the existing directory


@dataclass
class TrainingData:
    """Token stores, the batch plan and the collator of one run."""

    store: TrainingStore
    sampler: GlobalBatchSampler
    collator: Collator
    settings: DataSettings

    @property
    def train(self) -> StoreSplit:
        """The training cells."""
        return self.store.train

    @property
    def validation(self) -> StoreSplit:
        """The validation cells."""
        return self.store.validation

    @property
    def content_sha256(self) -> str:
        """The identity of the training data: a checksum over both splits' cells (see :mod:`..tokenize.store`)."""
        return self.store.content_sha256

    def train_micro_batches(self, step: int, rank: int) -> tuple[int, list[Batch]]:
        """``(epoch, micro-batches)`` of 0-based step ``step`` on ``rank``."""
        epoch, index_sets = self.sampler.micro_batches(step, rank)
        batches = [
            self.collator([self.train.cell(int(i)) for i in idx], idx, stream=TRAIN_STREAM, epoch=epoch)
            for idx in index_sets
        ]
        return epoch, batches

    def validation_plan(self, seed: int, world_size: int, rank: int) -> list[tuple[np.ndarray, bool]]:
        """This rank's validation micro-batches as ``(cell indices, counts)`` pairs.

        The validation cells (all, or a seeded subset of ``max_validation_cells``) are sorted by
        length, cut into micro-batches and dealt round-robin to ranks. Every rank gets the same
        number of entries, because FSDP needs every rank in every forward pass: a rank short of
        real batches gets filler entries (the first batch again) with ``counts=False``.
        """
        n = len(self.validation)
        limit = self.settings.max_validation_cells
        if 0 <= limit < n:  # Floyd's algorithm for a small sample: memory in the sample, not in n
            cells = np.sort(np.random.default_rng([seed, VALIDATION_STREAM]).choice(n, limit, replace=False))
        else:
            cells = np.arange(n)
        cells = cells[np.argsort(-self.validation.lengths(cells), kind="stable")]
        size = self.settings.eval_micro_batch_size
        micro = [cells[i : i + size] for i in range(0, cells.shape[0], size)]
        if not micro:
            return []
        per_rank = -(-len(micro) // world_size)
        mine = [(m, True) for m in micro[rank::world_size]]
        return mine + [(micro[0], False)] * (per_rank - len(mine))

    def validation_batch(self, indices: np.ndarray) -> Batch:
        """Collate validation cells with their fixed masks (epoch 0 of the validation stream)."""
        return self.collator(
            [self.validation.cell(int(i)) for i in indices], indices, stream=VALIDATION_STREAM, epoch=0
        )


def load_training_data(
    settings: DataSettings, vocab: Vocab, runtime: Runtime, *, layout: BatchLayout, seed: int
) -> TrainingData:
    """Run step 1 and set up steps 2–3 for this rank."""
    store = open_store(prepare_store(settings, runtime, vocab), vocab_size=vocab.size, splits=split_values(settings))
    longest = int(store.info["train"]["longest"])
    if longest > settings.max_length and runtime.dist.is_main:
        log.warning(
            "training cells of up to %d tokens are longer than data.max_length=%d and are truncated to their "
            "top-ranked genes",
            longest,
            settings.max_length,
        )
    masking = MaskingConfig.from_vocab(
        vocab,
        mlm_probability=settings.mlm_probability,
        mask_replace_prob=settings.mask_replace_prob,
        random_replace_prob=settings.random_replace_prob,
    )
    collator = Collator(
        masking=masking,
        pad_id=vocab.pad_id,
        eos_id=vocab.eos_id,
        max_length=settings.max_length,
        pad_to_multiple_of=settings.pad_to_multiple_of,
        seed=seed,
        pack=settings.packing,
    )
    lengths = ClippedLengths(store.train, settings.max_length)
    sampler = GlobalBatchSampler(lengths=lengths, layout=layout, seed=seed, window_batches=settings.window_batches)
    return TrainingData(store=store, sampler=sampler, collator=collator, settings=settings)
