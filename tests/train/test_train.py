"""End-to-end training: outputs, metrics, and the same losses whatever the world size and backend."""

from __future__ import annotations

import json
import math
import time

import pytest
from geneformer_workflow.train import main

from .conftest import EQUIVALENCE, FAST, compose, read_metrics, run_training, train_losses

TRAIN_METRICS = {
    "train/loss",
    "train/learning_rate",
    "train/grad_norm",
    "train/step_time",
    "train/tokens_per_second",
    "train/unpadded_tokens_per_second",
    "train/cpu_max_rss_gb",
    "train/tflops_per_second_per_rank",
    "train/mfu",
}


def test_main_returns_the_last_loss_and_writes_metrics_and_final_json(small_corpus, tmp_path):
    overrides = ("training.max_steps=6", "logging.eval_every=3", "logging.peak_tflops=0.5")
    loss = main(compose(small_corpus, tmp_path, *overrides))
    records = read_metrics(tmp_path)
    train = [r for r in records if "train/loss" in r]
    validation = [r for r in records if "validation/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert TRAIN_METRICS <= set(train[-1])
    assert train[-1]["train/unpadded_tokens_per_second"] <= train[-1]["train/tokens_per_second"]
    assert train[-1]["train/mfu"] == pytest.approx(100 * train[-1]["train/tflops_per_second_per_rank"] / 0.5)
    assert [r["step"] for r in validation] == [3, 6]
    assert 0.0 <= validation[-1]["validation/accuracy"] <= 1.0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["checkpoint"] == "checkpoints/step_6" and final["step"] == 6
    assert final["train_loss"] == pytest.approx(loss) == pytest.approx(train[-1]["train/loss"])
    assert final["validation_loss"] == pytest.approx(validation[-1]["validation/loss"])
    assert math.log(3002) - 1.0 < loss < math.log(3002) + 1.0  # about ln(V) at the start


@pytest.fixture(scope="module")
def single_process_losses(small_corpus, tmp_path_factory) -> dict[int, float]:
    """1 process with grad_accum=2: the same global batch of 4 cells as 2 processes x 1 step."""
    run_dir = tmp_path_factory.mktemp("single")
    main(compose(small_corpus, run_dir, *EQUIVALENCE, "training.grad_accum_steps=2"))
    return train_losses(run_dir)


@pytest.mark.slow
def test_two_process_fsdp2_matches_one_process(fsdp2_run, single_process_losses):
    losses = train_losses(fsdp2_run)
    assert sorted(losses) == list(range(1, 13))
    assert losses == pytest.approx(single_process_losses, abs=1e-5, rel=0)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(small_corpus, tmp_path, single_process_losses):
    run_training(2, small_corpus.overrides(tmp_path, *FAST, *EQUIVALENCE, "backend.name=ddp"))
    assert train_losses(tmp_path) == pytest.approx(single_process_losses, abs=1e-5, rel=0)


@pytest.mark.slow
def test_sanity_config_trains_with_two_processes_in_under_a_minute(sanity_corpus, tmp_path):
    started = time.perf_counter()
    proc = run_training(2, sanity_corpus.overrides(tmp_path, "wandb.mode=disabled"), timeout=180)
    elapsed = time.perf_counter() - started
    print(f"sanity config, 2 processes: {elapsed:.1f} s wall\n{proc.stdout[-2000:]}")
    losses = train_losses(tmp_path)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert losses[40] < losses[5]  # the synthetic corpus has learnable gene frequencies
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["step"] == 40 and final["validation_loss"] is not None
    assert elapsed < 90, f"sanity run took {elapsed:.0f} s"  # about 40 s on 2 busy cores; a generous guard


def test_packed_batches_train_like_padded_ones(small_corpus, tmp_path, single_process_losses):
    main(compose(small_corpus, tmp_path, *EQUIVALENCE, "training.grad_accum_steps=2", "data.packing=true"))
    packed = train_losses(tmp_path)
    assert packed == pytest.approx(single_process_losses, abs=1e-5, rel=0)
    last = [r for r in read_metrics(tmp_path) if "train/loss" in r][-1]
    # No cell is padded to the longest: only the tail up to pad_to_multiple_of (8) remains.
    assert last["train/unpadded_tokens_per_second"] >= 0.95 * last["train/tokens_per_second"]


@pytest.mark.slow
def test_two_process_fsdp2_packed_matches_one_process_padded(small_corpus, tmp_path, single_process_losses):
    run_training(2, small_corpus.overrides(tmp_path, *FAST, *EQUIVALENCE, "backend.name=fsdp2", "data.packing=true"))
    assert train_losses(tmp_path) == pytest.approx(single_process_losses, abs=1e-5, rel=0)


def test_profile_steps_writes_an_operator_table_and_a_trace(small_corpus, tmp_path):
    main(compose(small_corpus, tmp_path, "training.max_steps=4", "logging.profile_steps=[2,3]"))
    table = (tmp_path / "profile" / "rank0_steps2-3.txt").read_text()
    assert "aten::" in table and "Self CPU" in table
    assert (tmp_path / "profile" / "rank0_steps2-3.json").stat().st_size > 0
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4]


def test_profile_steps_must_be_an_ordered_pair(small_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"logging.profile_steps=\[3, 2\]"):
        main(compose(small_corpus, tmp_path, "training.max_steps=4", "logging.profile_steps=[3,2]"))
