"""Background collation (data.prefetch): same batches, same losses, errors surface on the training thread."""

from __future__ import annotations

import threading

import pytest
import torch
from geneformer_workflow.train import main
from geneformer_workflow.train.collate import Batch
from geneformer_workflow.train.prefetch import BatchPrefetcher

from .conftest import compose, train_losses


def fake_batches(step: int, rank: int) -> tuple[int, list[Batch]]:
    ids = torch.full((1, 4), step * 10 + rank)
    return step // 3, [Batch(ids, torch.ones_like(ids), ids.clone(), n_tokens=4, n_masked=4)]


def test_prefetched_batches_equal_direct_ones_in_any_order():
    built_on: list[str] = []

    def source(step: int, rank: int) -> tuple[int, list[Batch]]:
        built_on.append(threading.current_thread().name)
        return fake_batches(step, rank)

    prefetcher = BatchPrefetcher(source, enabled=True, pin_memory=False, end_step=10)
    try:
        for step in [0, 1, 2, 7, 8, 3]:  # 7 and 3 were not prefetched (a resume jumps)
            epoch, batches = prefetcher.get(step, 1)
            expected_epoch, expected = fake_batches(step, 1)
            assert epoch == expected_epoch
            assert torch.equal(batches[0].input_ids, expected[0].input_ids)
    finally:
        prefetcher.close()
    assert any(name.startswith("gfw-prefetch") for name in built_on)


def test_a_failing_build_raises_on_the_training_thread():
    def source(step: int, rank: int) -> tuple[int, list[Batch]]:
        if step == 1:
            msg = "corrupt cell"
            raise ValueError(msg)
        return fake_batches(step, rank)

    prefetcher = BatchPrefetcher(source, enabled=True, pin_memory=False, end_step=5)
    try:
        prefetcher.get(0, 0)
        with pytest.raises(ValueError, match="corrupt cell"):
            prefetcher.get(1, 0)
    finally:
        prefetcher.close()


def test_nothing_is_built_beyond_the_last_step():
    steps: list[int] = []
    prefetcher = BatchPrefetcher(lambda s, r: (steps.append(s), fake_batches(s, r))[1], enabled=True,
                                 pin_memory=False, end_step=2)  # fmt: skip
    prefetcher.get(0, 0)
    prefetcher.get(1, 0)
    prefetcher.close()
    assert sorted(steps) == [0, 1]


def test_training_with_and_without_prefetch_gives_the_same_losses(small_corpus, tmp_path):
    main(compose(small_corpus, tmp_path / "on", "training.max_steps=5", "data.prefetch=true"))
    main(compose(small_corpus, tmp_path / "off", "training.max_steps=5", "data.prefetch=false"))
    assert train_losses(tmp_path / "on") == train_losses(tmp_path / "off")
