"""Faults while writing checkpoints: a full disk (a small tmpfs, or a file size limit) and failed writes.

A failed save must leave no ``step_<n>`` that looks complete and no temporary directory, keep the
previous checkpoint, stop the run with an error naming the checkpoint and the problem, and a rerun
after freeing space must end with the weights of an uninterrupted run. Also: ``final.json`` may
not point outside its run directory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from geneformer_workflow.train import main
from geneformer_workflow.train.checkpoint import (
    AppState,
    CheckpointError,
    TrainState,
    describe_write_error,
    save_checkpoint,
    step_dirs,
)
from geneformer_workflow.train.distributed import DistributedConfig, Runtime
from geneformer_workflow.train.export import resolve_checkpoint
from geneformer_workflow.train.init_from import load_source_model
from torch.distributed.checkpoint.api import CheckpointException

from .conftest import (
    EQUIVALENCE,
    FAST,
    compose,
    mounted_tmpfs,
    run_training,
    subprocess_env,
    train_command,
    train_losses,
)
from .test_checkpoint import assert_same_weights, final_weights

# Fixed LR schedule (decay_steps) so that runs to step 2 and to step 4 follow the same one; a checkpoint every step.
RUN = ("scheduler.decay_steps=8", "checkpoint.save_every=1")
FILE_SIZE_LIMIT = 1_000_000  # bytes: above metrics.jsonl and the token cache, below one checkpoint shard (~4.5 MB)


@pytest.fixture(scope="module")
def clean_run(small_corpus, tmp_path_factory) -> Path:
    """Four uninterrupted steps."""
    run_dir = tmp_path_factory.mktemp("clean_run")
    main(compose(small_corpus, run_dir, *RUN, "training.max_steps=4"))
    return run_dir


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 32 MB tmpfs (skipped where mounting is not allowed)."""
    with mounted_tmpfs(tmp_path / "disk", "32m") as mountpoint:
        yield mountpoint


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def _fill(disk: Path, leave: int) -> Path:
    """Write a ballast file so that only ``leave`` bytes stay free on ``disk``."""
    ballast = disk / "ballast"
    with ballast.open("wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return ballast


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("limit", ["tmpfs-full", "file-size-limit"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_rerun_matches_a_clean_run(
    small_corpus, clean_run, tmp_path, request, limit
):
    disk = request.getfixturevalue("small_disk") if limit == "tmpfs-full" else tmp_path
    run_dir = disk / "run"
    main(compose(small_corpus, run_dir, *RUN, "training.max_steps=2"))  # step_1 and step_2 fit
    step_2 = run_dir / "checkpoints" / "step_2"
    ballast, preexec = None, None
    if limit == "tmpfs-full":
        ballast = _fill(disk, leave=_tree_bytes(step_2) // 2)  # room for the metrics, not for step_3
    else:
        preexec = _limit_file_size

    overrides = small_corpus.overrides(run_dir, *FAST, *RUN, "training.max_steps=4")
    proc = subprocess.run(
        train_command(1, overrides),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec,
    )

    step_3 = run_dir / "checkpoints" / "step_3"
    assert proc.returncode != 0, proc.stderr
    problem = "disk full" if limit == "tmpfs-full" else "File too large"
    message = proc.stderr.strip().splitlines()[-1]
    assert f"CheckpointError: cannot write checkpoint {step_3}: " in message, proc.stderr[-3000:]
    assert problem in message and f"the newest complete checkpoint is still {step_2}" in message
    assert [s for s, _ in step_dirs(run_dir)] == [1, 2]  # nothing new looks complete; the good ones stay
    assert not list((run_dir / "checkpoints").glob(".tmp_step_*")), "the partial checkpoint was left behind"
    assert not list(run_dir.rglob("*.tmp-*")), "a temporary file was left behind"
    assert not (run_dir / "final.json").exists()

    if ballast is not None:
        ballast.unlink()  # free the space
    main(compose(small_corpus, run_dir, *RUN, "training.max_steps=4"))
    assert [s for s, _ in step_dirs(run_dir)][-1] == 4
    assert train_losses(run_dir) == train_losses(clean_run)
    assert_same_weights(final_weights(run_dir), final_weights(clean_run))


@pytest.mark.slow
def test_full_disk_during_a_two_rank_checkpoint_stops_both_ranks_and_the_rerun_matches(
    small_corpus, small_disk, fsdp2_run
):
    """FSDP2 on two processes: every rank stops (no hang in a collective), rank 0 removes the partial checkpoint."""
    run_dir = small_disk / "run"
    overrides = small_corpus.overrides(run_dir, *FAST, *EQUIVALENCE, "backend.name=fsdp2")
    run_training(2, [*overrides, "training.max_steps=4", "scheduler.decay_steps=12"])  # step_4 fits
    ballast = _fill(small_disk, leave=_tree_bytes(run_dir / "checkpoints" / "step_4") // 2)
    proc = subprocess.run(
        train_command(2, overrides), env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0, proc.stderr
    for rank in (0, 1):
        assert f"[rank{rank}]: gfw train: error: CheckpointError: cannot write checkpoint " in proc.stderr
    assert "step_8: no space left on device (disk full)" in proc.stderr
    assert [s for s, _ in step_dirs(run_dir)] == [4]
    assert not list((run_dir / "checkpoints").glob(".tmp_step_*"))
    ballast.unlink()
    run_training(2, overrides)
    assert train_losses(run_dir) == train_losses(fsdp2_run)
    assert_same_weights(final_weights(run_dir), final_weights(fsdp2_run))


def _tiny_app(step: int) -> AppState:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return AppState(model, optimizer, scheduler, TrainState(step=step), backend="none")


def _save(run_dir: Path, step: int) -> Path:
    runtime = Runtime(dist=DistributedConfig(), device=torch.device("cpu"))
    return save_checkpoint(run_dir, _tiny_app(step), runtime, meta={}, model_config={"x": 1}, keep_last=1)


def _full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["shards", "metadata-json"])
def test_a_failed_save_removes_its_partial_directory_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    from geneformer_workflow.train import checkpoint

    previous = _save(tmp_path, 1)
    if where == "shards":
        monkeypatch.setattr(checkpoint.dcp, "save", _full_disk)
    else:
        original = checkpoint.write_json_atomic

        def fail_on_metadata(path: Path, payload: dict) -> None:
            original(path, payload)  # the file is complete when the disk fills up ...
            _full_disk()  # ... and the next write fails

        monkeypatch.setattr(checkpoint, "write_json_atomic", fail_on_metadata)
    with pytest.raises(CheckpointError, match=r"step_2: no space left on device \(disk full\)") as err:
        _save(tmp_path, 2)
    assert f"the newest complete checkpoint is still {previous}" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]  # not pruned, nothing partial


def _dcp_failure(error: BaseException) -> CheckpointException:
    return CheckpointException("save failed", {0: (error, None)})


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__context__ = inner
    return outer


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # One process: DCP reports torch.save's "unexpected pos" error, with ENOSPC chained behind it.
        (_dcp_failure(_chained(RuntimeError("unexpected pos 704 vs 598"), OSError(errno.ENOSPC, "No space"))),
         "disk full"),
        (_dcp_failure(OSError(errno.EDQUOT, "Disk quota exceeded")), "disk quota exceeded"),
        (OSError(errno.EFBIG, "File too large"), "file size limit"),
    ],
    ids=["enospc-behind-dcp", "quota", "file-size"],
)  # fmt: skip
def test_out_of_space_errors_are_named(tmp_path, error, expected):
    problem, out_of_space = describe_write_error(error, tmp_path)
    assert out_of_space and expected in problem


def test_other_write_errors_name_the_rank_error_not_the_dcp_traceback(tmp_path):
    problem, out_of_space = describe_write_error(_dcp_failure(PermissionError(errno.EACCES, "denied")), tmp_path)
    assert not out_of_space and problem == "PermissionError: [Errno 13] denied"


def test_a_nearly_empty_file_system_counts_as_full_when_the_cause_was_lost(tmp_path, monkeypatch):
    """With several ranks DCP pickles each rank's error, which drops the chained ENOSPC."""
    from geneformer_workflow.train import checkpoint

    monkeypatch.setattr(checkpoint, "_free_bytes", lambda _path: 4096)
    problem, out_of_space = describe_write_error(_dcp_failure(RuntimeError("unexpected pos 704 vs 598")), tmp_path)
    assert out_of_space and "0.0 MiB free" in problem


@pytest.mark.parametrize(
    "value", ["../../elsewhere/checkpoints/step_1", "/abs/checkpoints/step_1", "checkpoints/../../x", 5],
    ids=["dotdot", "absolute", "inner-dotdot", "not-a-string"],
)  # fmt: skip
def test_final_json_may_not_point_outside_its_run_directory(tmp_path, value):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_1").mkdir(parents=True)
    (run_dir / "final.json").write_text(json.dumps({"checkpoint": value}))
    for load in (resolve_checkpoint, load_source_model):  # gfw export and model.init_from
        with pytest.raises(CheckpointError, match=re.escape(f"{run_dir / 'final.json'}: 'checkpoint'={value!r}")):
            load(run_dir)


def test_final_json_names_a_checkpoint_of_its_run(tmp_path):
    (tmp_path / "final.json").write_text(json.dumps({"checkpoint": "checkpoints/step_7"}))
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_7"


def test_training_writes_nothing_outside_run_dir(small_corpus, tmp_path, monkeypatch):
    """Outputs stay in ``run_dir`` (the cache included, by default); the inputs and the working directory stay as
    they were."""

    def snapshot(path: Path) -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")}

    inputs = [small_corpus.files[0].parent, small_corpus.vocab_dir]
    before = [snapshot(p) for p in inputs]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    main(compose(small_corpus, Path("run"), "training.max_steps=1"))  # a relative run_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    assert {"cache", "checkpoints", "final.json", "metrics.jsonl"} <= {p.name for p in (cwd / "run").iterdir()}
    assert [snapshot(p) for p in inputs] == before
