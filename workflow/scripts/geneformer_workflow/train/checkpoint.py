"""Distributed checkpoints: ``run_dir/checkpoints/step_<n>/``, complete or absent.

Layout of one checkpoint::

    checkpoints/step_<n>/
        .metadata, __*_*.distcp     torch.distributed.checkpoint (DCP) shards, one set per rank:
                                    app.model.* (parameters, sharded as trained), app.optim.* (AdamW state),
                                    app.scheduler.*, app.trainer.* (step, epoch, tokens and cells seen),
                                    app.fp8.* (Transformer Engine delayed-scaling state, see fp8_state.py)
        checkpoint.json             step, epoch, data position, batch layout, seed, vocab_dir, backend, train loss
        model_config.json           ``ModelConfig.to_dict()``: enough to rebuild the model for export

All ranks write their shards into ``checkpoints/.tmp_step_<n>``; rank 0 then adds the JSON
files (each itself written under a temporary name, fsynced and renamed) and renames the directory,
so a ``step_<n>`` directory only ever appears complete. A save that fails (disk full, quota, file
size limit, I/O error) removes its temporary directory, keeps every earlier checkpoint and raises
:class:`CheckpointError` naming the checkpoint and the problem; rerunning the same command after
freeing space resumes from the newest complete checkpoint. The last ``keep_last`` checkpoints are
kept; older ones are deleted only after the new one is complete. DCP saves sharded state and reshards it on load, so a
run may resume with a different number of processes (the global batch must stay the same).

RNG state is not saved: dropout is reseeded at every step from ``(seed, step, rank)`` and the
masks are keyed per cell, so a resumed run reproduces the uninterrupted one exactly.

Transformer Engine's ``_extra_state`` entries are never saved: their size differs between a trained and a fresh
module, TE 2.20 refuses to unpickle them, and megatron-fsdp drops them; the FP8 state they carry is saved as plain
tensors instead (:mod:`.fp8_state`), and loading accepts their absence, every backend alike.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from ..atomic import FULL_BELOW_BYTES, NO_SPACE, fsync_dir
from ..atomic import write_json_atomic as write_json_atomic  # fsynced, then renamed: readers never see half a file
from ..model import GeneformerForMaskedLM, ModelConfig
from ..model.te_names import EXTRA_STATE_SUFFIX

# The run-directory names that the report reads too live in the torch-free run_dir module; re-exported here.
from ..run_dir import CHECKPOINTS, CheckpointError, read_json
from ..run_dir import FINAL_FILE as FINAL_FILE
from ..run_dir import STEP_DIR as _STEP_DIR
from ..run_dir import final_checkpoint as final_checkpoint
from .backends import BACKENDS, Backend
from .distributed import Runtime, barrier
from .fp8_state import Fp8ScalingState

log = logging.getLogger(__name__)

META_FILE = "checkpoint.json"
MODEL_CONFIG_FILE = "model_config.json"
# DCP wraps reader and writer errors in CheckpointException, which derives from BaseException, not Exception.
_DCP_ERRORS = (Exception, CheckpointException)
FORMAT_VERSION = 1
# With several ranks DCP pickles each rank's error, which drops the OSError chained behind torch.save's
# "unexpected pos" RuntimeError; less free space than FULL_BELOW_BYTES after a failed save then means a full disk.


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@dataclass
class TrainState:
    """Counters that advance with training (saved in every checkpoint)."""

    step: int = 0  # completed optimizer steps
    epoch: int = 0  # epoch of the last completed step
    tokens_seen: int = 0  # unpadded training tokens over all ranks
    cells_seen: int = 0


def without_extra_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without ``*._extra_state`` entries (TE's FP8 metadata: see the module docstring)."""
    return {key: value for key, value in state.items() if not key.endswith(EXTRA_STATE_SUFFIX)}


def check_loaded_keys(missing: list[str], unexpected: list[str]) -> None:
    """After a non-strict ``load_state_dict``: only ``_extra_state`` entries may be missing, nothing unexpected."""
    missing = [key for key in missing if not key.endswith(EXTRA_STATE_SUFFIX)]
    if missing or unexpected:
        msg = (
            f"the checkpoint's model does not match this model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}; was it trained with other model settings?"
        )
        raise ValueError(msg)


class AppState(Stateful):
    """Everything DCP saves and restores, as one ``Stateful``.

    ``get_state_dict`` / ``set_state_dict`` give the same keys for none, ddp and fsdp2 (no
    ``module.`` prefix from DDP; FSDP2 keeps the sharded DTensors), so checkpoints move between
    these backends. megatron-fsdp is not supported by those helpers; its wrapper's own
    ``state_dict`` methods are used instead (its keys carry a ``module.`` prefix). Model state never
    holds ``_extra_state`` entries; ``fp8``, when given, adds the FP8 delayed-scaling tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: TrainState,
        *,
        backend: Backend | str,
        fp8: Fp8ScalingState | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.backend = BACKENDS[backend] if isinstance(backend, str) else backend
        self.fp8 = fp8

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, scheduler and counters (and the FP8 scaling state)."""
        model_state, optim_state = self.backend.get_state(self.model, self.optimizer)
        state = {
            "model": without_extra_state(model_state),
            "optim": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "trainer": asdict(self.state),
        }
        if self.fp8 is not None:
            state["fp8"] = self.fp8.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore in place."""
        result = self.backend.set_state(self.model, self.optimizer, state_dict["model"], state_dict["optim"])
        check_loaded_keys(list(result.missing_keys), list(result.unexpected_keys))
        self.scheduler.load_state_dict(state_dict["scheduler"])
        for key, value in state_dict["trainer"].items():
            setattr(self.state, key, int(value))
        if self.fp8 is not None:
            self.fp8.load_state_dict(state_dict.get("fp8", {}))


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoints/step_<n>`` directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step_<n>`` directory, or None when there is none."""
    dirs = step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def _error_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, the exceptions chained to it and, for DCP's ``CheckpointException``, every rank's error."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in current.failures.values()]


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def describe_write_error(err: BaseException, directory: Path) -> tuple[str, bool]:
    """``(problem, out_of_space)`` for a failed write under ``directory``, e.g. ``"no space left ... (disk full)"``.

    Looks through chained and per-rank errors for an ``OSError`` (DCP hides ENOSPC behind torch.save's
    ``unexpected pos`` RuntimeError); without one, a nearly empty file system still counts as full.
    """
    errors = list(_error_chain(err))
    os_errors = [e for e in errors if isinstance(e, OSError) and e.errno is not None]
    for error in os_errors:
        if error.errno in NO_SPACE:
            return f"{NO_SPACE[error.errno]} [{error}]", True
    free = _free_bytes(directory)
    if not os_errors and free is not None and free < FULL_BELOW_BYTES:
        return f"{NO_SPACE[errno.ENOSPC]}: {free / 2**20:.1f} MiB free on {directory}", True
    # DCP's own message is a multi-line traceback: name the first rank's error (or the OSError) instead.
    detail = os_errors[0] if os_errors else next((e for e in errors if not isinstance(e, CheckpointException)), err)
    return f"{type(detail).__name__}: {detail}", False


def _save_failed(err: BaseException, final: Path, tmp: Path, runtime: Runtime) -> CheckpointError:
    """Remove the partial checkpoint (rank 0) and build the error that names it, the problem and the fix."""
    problem, out_of_space = describe_write_error(err, tmp.parent)
    if runtime.dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # incomplete either way; removing it also frees the space it took
    previous = latest_checkpoint(final.parent.parent)
    kept = f"the newest complete checkpoint is still {previous}" if previous else "no complete checkpoint exists yet"
    fix = "free space (or raise the quota or limit)" if out_of_space else "fix the cause"
    msg = (
        f"cannot write checkpoint {final}: {problem}. The partial checkpoint {tmp} was removed and {kept}; "
        f"{fix}, then rerun the same command to resume from it"
    )
    return CheckpointError(msg)


def save_checkpoint(
    run_dir: Path,
    app: AppState,
    runtime: Runtime,
    *,
    meta: dict[str, Any],
    model_config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Save ``app`` as ``checkpoints/step_<step>`` (collective: every rank calls it).

    Args:
        run_dir: The run directory.
        app: State to save; ``app.state.step`` names the directory.
        runtime: Rank and process group.
        meta: Extra fields for ``checkpoint.json`` (written by rank 0).
        model_config: ``ModelConfig.to_dict()`` for ``model_config.json``.
        keep_last: Checkpoints to keep (older ones are deleted); <= 0 keeps all.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: when writing fails; the partial checkpoint is removed, earlier ones are kept.
    """
    root = Path(run_dir) / CHECKPOINTS
    step = app.state.step
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if final.is_dir():  # e.g. the end of a run that resumed from its last step: nothing new to save
        return final
    try:
        if runtime.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(runtime)
        with _single_process_ok():
            dcp.save({"app": app}, checkpoint_id=tmp)  # a failure on any rank raises on every rank
        barrier(runtime)
        if runtime.dist.is_main:
            payload = {"format": FORMAT_VERSION, **asdict(app.state), **meta}
            write_json_atomic(tmp / META_FILE, payload)
            write_json_atomic(tmp / MODEL_CONFIG_FILE, model_config)
            os.rename(tmp, final)
    except _DCP_ERRORS as err:
        raise _save_failed(err, final, tmp, runtime) from err
    if runtime.dist.is_main:
        fsync_dir(root)
        prune_checkpoints(run_dir, keep_last)  # only now: the previous checkpoint stays until this one is complete
    barrier(runtime)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (<= 0 keeps all); returns what was deleted."""
    dirs = step_dirs(run_dir)
    doomed = [p for _, p in dirs[:-keep_last]] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete ``.tmp_step_*`` leftovers of a killed save (rank 0, before training)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp_step_*"):
            shutil.rmtree(path, ignore_errors=True)


def check_complete(path: Path) -> dict[str, Any]:
    """Return ``checkpoint.json`` of ``path``, or raise :class:`CheckpointError` naming what is missing."""
    missing = [name for name in (".metadata", META_FILE, MODEL_CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        msg = (
            f"checkpoint {path} is incomplete or corrupt (missing {missing}); delete it to resume from the "
            "previous checkpoint, or start a new run_dir"
        )
        raise CheckpointError(msg)
    return read_json(path / META_FILE)


FP8_PREFIX = "app.fp8."


def saved_fp8_shapes(path: Path) -> dict[str, torch.Size]:
    """Keys (without ``app.fp8.``) and shapes of the FP8 scaling tensors that checkpoint ``path`` holds."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {
        key.removeprefix(FP8_PREFIX): entry.size
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(FP8_PREFIX) and hasattr(entry, "size")
    }


def load_checkpoint(path: Path, app: AppState) -> None:
    """Restore ``app`` in place from checkpoint ``path`` (collective)."""
    check_complete(path)
    try:
        if app.fp8 is not None:
            app.fp8.expect(saved_fp8_shapes(path))
        with _single_process_ok():
            dcp.load({"app": app}, checkpoint_id=path)
    except _DCP_ERRORS as err:
        msg = (
            f"cannot load checkpoint {path}: {type(err).__name__}: {err}. Delete it to resume from the previous "
            "checkpoint, or start a new run_dir"
        )
        raise CheckpointError(msg) from err


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model parameters of checkpoint ``path`` into an unwrapped model, on one process.

    DCP reads without a process group here, and reassembles the shards of all ranks.
    """
    meta = check_complete(path)
    backend = BACKENDS.get(str(meta.get("backend")))
    prefix = backend.weight_prefix if backend is not None else ""  # megatron-fsdp's wrapper prefixes its keys
    state = {prefix + key: value for key, value in without_extra_state(model.state_dict()).items()}
    try:
        with _single_process_ok():
            dcp.load({"app": {"model": state}}, checkpoint_id=path)
    except _DCP_ERRORS as err:
        msg = f"cannot load the model weights of checkpoint {path}: {type(err).__name__}: {err}"
        raise CheckpointError(msg) from err
    result = model.load_state_dict({key.removeprefix(prefix): value for key, value in state.items()}, strict=False)
    check_loaded_keys(list(result.missing_keys), list(result.unexpected_keys))


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A ``step_<n>`` directory from a run dir (``final.json``, else the newest checkpoint) or a step dir."""
    path = Path(checkpoint)
    if (path / MODEL_CONFIG_FILE).is_file() or path.name.startswith("step_"):
        return path
    final = path / FINAL_FILE
    if final.is_file():
        return final_checkpoint(path)  # refuses a final.json that points outside the run directory
    latest = latest_checkpoint(path)
    if latest is None:
        msg = f"{path} is neither a checkpoint (step_<n>) nor a run directory with checkpoints"
        raise FileNotFoundError(msg)
    return latest


def load_checkpoint_model(checkpoint: str | Path) -> tuple[GeneformerForMaskedLM, dict]:
    """Build the model from ``model_config.json`` and load the checkpoint's weights (fp32, eval mode).

    Returns:
        ``(model, checkpoint.json contents)``.
    """
    path = resolve_checkpoint(checkpoint)
    meta = check_complete(path)
    config = ModelConfig.from_dict(read_json(path / MODEL_CONFIG_FILE))
    config.gradient_checkpointing = False  # a training option; the export config never carries it
    model = GeneformerForMaskedLM(config)
    load_model_weights(path, model)
    return model.eval(), meta
