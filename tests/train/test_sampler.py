"""The global batch plan: reproducible, the same whatever the world size, length-grouped."""

from __future__ import annotations

import numpy as np
import pytest
from geneformer_workflow.train.sampler import (
    BatchLayout,
    EpochPermutation,
    GlobalBatchSampler,
    epoch_global_batches,
    padding_waste,
    rank_micro_batches,
)

LENGTHS = np.clip(np.random.default_rng(0).lognormal(np.log(1000), 0.5, size=1_000), 50, 2048).astype(int)


def test_epoch_plan_is_reproducible_and_changes_with_the_epoch():
    kw = {"global_batch_size": 16, "seed": 3, "window_batches": 10}
    a = epoch_global_batches(LENGTHS, epoch=0, **kw)
    assert np.array_equal(a, epoch_global_batches(LENGTHS, epoch=0, **kw))
    assert not np.array_equal(a, epoch_global_batches(LENGTHS, epoch=1, **kw))
    assert a.shape == (62, 16)  # 1,000 // 16 batches; the last 8 cells are dropped
    assert len(np.unique(a)) == a.size  # no cell twice in an epoch


def test_longest_batch_comes_first():
    plan = epoch_global_batches(LENGTHS, global_batch_size=16, seed=3, epoch=2, window_batches=10)
    assert LENGTHS[plan[0]].max() == LENGTHS[plan.ravel()].max()


@pytest.mark.parametrize(("world_size", "grad_accum"), [(1, 4), (2, 2), (4, 1)], ids=["1x4", "2x2", "4x1"])
def test_global_batch_cells_do_not_depend_on_world_size(world_size, grad_accum):
    reference = GlobalBatchSampler(LENGTHS, BatchLayout(4, 1, 4), seed=5, window_batches=10)
    sampler = GlobalBatchSampler(LENGTHS, BatchLayout(4, world_size, grad_accum), seed=5, window_batches=10)
    for step in (0, 7, 61, 62, 100):  # 62 = first step of epoch 1
        _, ref_batches = reference.micro_batches(step, 0)
        micro = [m for r in range(world_size) for m in sampler.micro_batches(step, r)[1]]
        assert sorted(map(tuple, micro)) == sorted(map(tuple, ref_batches))  # the same micro-batches, redistributed


def test_ranks_partition_the_global_batch_with_equal_step_counts():
    layout = BatchLayout(micro_batch_size=3, world_size=4, grad_accum=2)
    batch = np.arange(24)
    parts = [rank_micro_batches(batch, layout, r) for r in range(4)]
    assert all(len(p) == 2 and all(len(m) == 3 for m in p) for p in parts)
    assert sorted(np.concatenate([m for p in parts for m in p]).tolist()) == list(range(24))


def test_step_maps_to_epoch_and_position():
    sampler = GlobalBatchSampler(LENGTHS, BatchLayout(4, 2, 2), seed=0, window_batches=10)
    assert sampler.batches_per_epoch == 62
    assert sampler.position(0) == (0, 0) and sampler.position(62) == (1, 0) and sampler.position(130) == (2, 6)


def test_length_grouping_wastes_less_padding_than_random_batches():
    layout = BatchLayout(micro_batch_size=8, world_size=1, grad_accum=1)
    sampler = GlobalBatchSampler(LENGTHS, layout, seed=0, window_batches=50)
    grouped = [sampler.micro_batches(s, 0)[1][0] for s in range(sampler.batches_per_epoch)]
    random = list(np.random.default_rng(0).permutation(len(LENGTHS))[: 8 * len(grouped)].reshape(-1, 8))
    waste_grouped, waste_random = padding_waste(LENGTHS, grouped), padding_waste(LENGTHS, random)
    assert waste_grouped < 0.05 < 0.25 < waste_random, (waste_grouped, waste_random)


def test_too_few_cells_for_one_global_batch_names_the_keys():
    with pytest.raises(ValueError, match=r"data\.micro_batch_size"):
        GlobalBatchSampler(np.array([5, 6, 7]), BatchLayout(2, 2, 1), seed=0, window_batches=1)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1_000, 4_097])
def test_epoch_permutation_is_a_bijection_with_an_inverse(n):
    perm = EpochPermutation(n, seed=7, epoch=3)
    cells = perm(np.arange(n))
    assert sorted(cells.tolist()) == list(range(n))
    assert np.array_equal(perm.inverse(cells), np.arange(n))
    if n > 5:  # another epoch, another order
        assert not np.array_equal(cells, EpochPermutation(n, seed=7, epoch=4)(np.arange(n)))


def test_the_shuffle_mixes_the_whole_corpus_into_each_window():
    n = 100_000
    cells = EpochPermutation(n, seed=1, epoch=0)(np.arange(2_000))  # the first window's cells
    assert cells.min() < n * 0.01 and cells.max() > n * 0.99  # drawn from the whole corpus, not one stretch
    assert abs(np.corrcoef(np.arange(2_000), cells)[0, 1]) < 0.1
    assert np.histogram(cells, bins=10, range=(0, n))[0].min() > 150  # about 200 per tenth of the corpus


class CountingLengths:
    """A lengths array that records the largest lookup: what the sampler holds at once."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths, self.largest = lengths, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        self.largest = max(self.largest, len(indices))
        return self.lengths[indices]

    def argmax(self) -> int:
        return int(np.argmax(self.lengths))


def test_the_sampler_holds_one_window_and_matches_the_whole_epoch_plan():
    lengths = np.random.default_rng(2).integers(50, 4_000, size=20_011)
    counting = CountingLengths(lengths)
    layout = BatchLayout(micro_batch_size=4, world_size=2, grad_accum=2)  # global batch 16
    sampler = GlobalBatchSampler(counting, layout, seed=9, window_batches=25)
    steps = [sampler.global_batch(s)[1] for s in range(sampler.batches_per_epoch)]
    assert counting.largest <= 25 * 16  # one window of cells at a time, never the epoch
    plan = epoch_global_batches(lengths, global_batch_size=16, seed=9, epoch=0, window_batches=25)
    assert np.array_equal(np.stack(steps), plan)
    assert len(np.unique(plan)) == plan.size == (20_011 // 16) * 16
    late = GlobalBatchSampler(lengths, layout, seed=9, window_batches=25)  # a resume: starts mid-epoch
    assert np.array_equal(late.global_batch(1_000)[1], plan[1_000])


def test_the_unique_longest_cell_leads_the_epoch():
    lengths = np.random.default_rng(4).integers(50, 1_000, size=5_000)
    lengths[1234] = 5_000
    for epoch in range(3):
        plan = epoch_global_batches(lengths, global_batch_size=8, seed=1, epoch=epoch, window_batches=20)
        assert plan[0][0] == 1234
