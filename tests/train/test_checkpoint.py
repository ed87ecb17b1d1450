"""Checkpoints: exact stop-and-go, crash recovery, signals, pruning and clear errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from geneformer_workflow.train import main
from geneformer_workflow.train.checkpoint import CheckpointError, step_dirs
from geneformer_workflow.train.export import load_checkpoint_model

from .conftest import (
    EQUIVALENCE,
    FAST,
    compose,
    read_metrics,
    run_training,
    subprocess_env,
    train_command,
    train_losses,
)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint_model(run_dir)
    return model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in their own sessions, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended early (exit {proc.returncode})\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


# Dropout on, so that the test also covers the per-step reseeding of the dropout RNG.
STOP_AND_GO = ("scheduler.decay_steps=8", "model.hidden_dropout_prob=0.1", "model.attention_probs_dropout_prob=0.1")


def test_stop_and_resume_gives_identical_losses_and_weights(small_corpus, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    main(compose(small_corpus, straight, *STOP_AND_GO, "training.max_steps=8"))
    main(compose(small_corpus, halves, *STOP_AND_GO, "training.max_steps=4"))
    assert [s for s, _ in step_dirs(halves)] == [4]
    main(compose(small_corpus, halves, *STOP_AND_GO, "training.max_steps=8"))
    assert train_losses(halves) == train_losses(straight)  # exact: same data, masks, dropout and arithmetic
    assert_same_weights(final_weights(halves), final_weights(straight))
    assert json.loads((halves / "final.json").read_text())["step"] == 8


def test_only_the_newest_checkpoints_are_kept(small_corpus, tmp_path):
    main(compose(small_corpus, tmp_path, "training.max_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=2"))
    assert [s for s, _ in step_dirs(tmp_path)] == [3, 4]


@pytest.mark.parametrize(
    ("change", "message"),
    [("data.micro_batch_size=4", "global_batch_size"), ("data.window_batches=8", "data.window_batches")],
    ids=["global-batch", "length-window"],
)
def test_resume_refuses_a_different_data_order(small_corpus, tmp_path, change, message):
    main(compose(small_corpus, tmp_path, "training.max_steps=2"))
    with pytest.raises(ValueError, match=re.escape(message)):
        main(compose(small_corpus, tmp_path, "training.max_steps=4", change))


def test_existing_checkpoints_with_resume_off_is_an_error(small_corpus, tmp_path):
    main(compose(small_corpus, tmp_path, "training.max_steps=2"))
    with pytest.raises(ValueError, match=re.escape("checkpoint.resume=true")):
        main(compose(small_corpus, tmp_path, "training.max_steps=4", "checkpoint.resume=false"))


@pytest.mark.parametrize("damage", ["truncated-shard", "missing-metadata"])
def test_corrupt_latest_checkpoint_is_an_error_naming_it(small_corpus, tmp_path, damage):
    main(compose(small_corpus, tmp_path, "training.max_steps=2", "checkpoint.save_every=1"))
    latest = tmp_path / "checkpoints" / "step_2"
    if damage == "truncated-shard":
        shard = next(latest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (latest / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(latest))):
        main(compose(small_corpus, tmp_path, "training.max_steps=4"))


def test_partial_checkpoint_of_a_killed_save_is_ignored_and_removed(small_corpus, tmp_path):
    main(compose(small_corpus, tmp_path, "training.max_steps=2"))
    partial = tmp_path / "checkpoints" / ".tmp_step_3"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a file")
    main(compose(small_corpus, tmp_path, "training.max_steps=3"))
    assert not partial.exists()
    assert [s for s, _ in step_dirs(tmp_path)] == [2, 3]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(small_corpus, tmp_path):
    overrides = small_corpus.overrides(tmp_path, *FAST, "training.max_steps=100000", "scheduler.decay_steps=100")
    proc = subprocess.Popen(
        train_command(1, overrides), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    saved = step_dirs(tmp_path)
    assert len(saved) == 1
    last_logged = max(r["step"] for r in read_metrics(tmp_path))
    assert saved[0][0] == last_logged  # the checkpoint is the end of the last completed step
    assert not (tmp_path / "final.json").exists()  # the run is not finished
    main(compose(small_corpus, tmp_path, f"training.max_steps={last_logged + 2}", "scheduler.decay_steps=100"))
    assert sorted(train_losses(tmp_path)) == list(range(1, last_logged + 3))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_weights(small_corpus, tmp_path, fsdp2_run):
    overrides = small_corpus.overrides(tmp_path, *FAST, *EQUIVALENCE, "backend.name=fsdp2")
    # Saving and validating every step does not change the numerics; it only widens the window for the kill.
    slow = [*overrides, "checkpoint.save_every=1", "logging.eval_every=1"]
    proc = subprocess.Popen(
        train_command(2, slow),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (tmp_path / "checkpoints" / "step_4").is_dir(), proc)
    for pid in [*descendants(proc.pid), proc.pid]:  # like a node failure: workers and launcher die at once
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (tmp_path / "final.json").exists(), "the run finished before it was killed"
    run_training(2, overrides)
    assert train_losses(tmp_path) == train_losses(fsdp2_run)
    assert_same_weights(final_weights(tmp_path), final_weights(fsdp2_run))


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(small_corpus, tmp_path):
    from geneformer_workflow.train.trainer import NonFiniteLossError

    diverge = ("optimizer.lr=1e12", "scheduler.warmup_steps=1", "training.max_grad_norm=null")
    cfg = compose(
        small_corpus, tmp_path, "training.max_steps=12", "checkpoint.save_every=1", "logging.log_every=1", *diverge
    )
    with pytest.raises(
        NonFiniteLossError, match=r"the training loss became (nan|inf) between steps \d+ and \d+"
    ) as err:
        main(cfg)
    saved = step_dirs(tmp_path)
    assert not (tmp_path / "final.json").exists()
    assert saved, "the run diverged before its first checkpoint; the test needs a later divergence"
    assert str(saved[-1][1]) in str(err.value)
    last_good = load_checkpoint_model(saved[-1][1])[0]
    assert all(torch.isfinite(p).all() for p in last_good.parameters())
