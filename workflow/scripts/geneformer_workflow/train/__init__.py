"""Pretrain a Geneformer BERT masked-LM with ``torchrun`` + FSDP2 (CPU or GPU), DDP or megatron-fsdp.

One CPU process (the sanity tier, a few seconds)::

    gfw train --config-name sanity data.corpus=[results/tokenized/demo.parquet] \\
        data.vocab_dir=results/vocab run_dir=results/train/sanity

Several processes on one machine (FSDP2 over gloo on CPU, NCCL on GPU)::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m geneformer_workflow train --config-name sanity data.corpus=[a.parquet,b.parquet] \\
        data.vocab_dir=results/vocab run_dir=results/train/sanity

Several nodes under SLURM (one ``torchrun`` per node; the rendezvous host is the first node)::

    srun --nodes=2 --ntasks=2 --ntasks-per-node=1 bash -c 'torchrun --nnodes 2 --nproc_per_node 8 \\
        --rdzv-backend c10d --rdzv-endpoint "$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n1):29500" \\
        --rdzv-id "$SLURM_JOB_ID" -m geneformer_workflow train --config-name 106m run_dir=... data.corpus=[...] \\
        data.vocab_dir=...'

Rerunning the same command resumes from the newest checkpoint in ``run_dir/checkpoints``.
See docs/training.md for every config key, the checkpoint layout and the metric names.

Errors that name their fix (config, checkpoint, corpus cache, NaN loss, missing CUDA or Transformer Engine)
end ``gfw train`` with one line ``gfw train: error: ...`` on stderr (prefixed ``[rank<n>]:`` under torchrun)
and exit code 1; anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ..errors import SetupError
from .checkpoint import CheckpointError
from .config import DEFAULT_CONFIG_DIR, check_environment, compose_config, validate_config
from .corpus import CacheWriteError
from .distributed import DistributedConfig, close_runtime, init_runtime
from .trainer import NonFiniteLossError, Trainer

__all__ = ["DEFAULT_CONFIG_DIR", "check_environment", "cli_main", "compose_config", "main", "validate_config"]

log = logging.getLogger(__name__)

# Errors whose message names the problem and the fix: one line for the user, no traceback.
_USER_ERRORS = (
    ValueError,
    HydraException,
    OmegaConfBaseException,
    CheckpointError,
    CacheWriteError,
    NonFiniteLossError,
    SetupError,  # missing CUDA, Transformer Engine or megatron-fsdp
)


def main(cfg: DictConfig) -> float:
    """Train with a composed config; returns the last logged train loss (NaN if none was logged).

    Starts the process group (for more than one process), trains, and always closes loggers
    and the process group, on success and on error alike.
    """
    validate_config(cfg)
    check_environment(cfg)  # GPUs, WORLD_SIZE and the resumed global batch: before any rendezvous or data
    runtime = init_runtime(str(cfg.training.device), timeout_s=60.0 * float(cfg.training.dist_timeout_minutes))
    trainer = None
    try:
        trainer = Trainer(cfg, runtime)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        close_runtime(runtime)


def build_parser() -> argparse.ArgumentParser:
    """``gfw train`` arguments: a config choice plus Hydra overrides."""
    parser = argparse.ArgumentParser(
        prog="gfw train",
        description="Pretrain a Geneformer BERT masked-LM. Run under torchrun for several processes.",
        epilog="Example: gfw train --config-name sanity data.corpus=[c.parquet] data.vocab_dir=vocab run_dir=out",
    )
    parser.add_argument(
        "--config-dir",
        default=str(DEFAULT_CONFIG_DIR),
        help="directory of training configs (default: the repository's config/train)",
    )
    parser.add_argument(
        "--config-name",
        default="sanity",
        help="config file name without .yaml: sanity, 10m, 106m, 4b, ... (default: sanity)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value, e.g. training.max_steps=100")
    return parser


def cli_main(argv: list[str]) -> int:
    """Entry point of ``gfw train``; returns the process exit code (0 also after a SIGTERM/SIGUSR1 stop)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as err:
        if not _is_user_error(err):
            raise
        rank, world_size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
        prefix = f"[rank{rank}]: " if rank is not None and world_size != "1" else ""  # as torch prefixes tracebacks
        print(f"{prefix}gfw train: error: {_error_line(err)}", file=sys.stderr, flush=True)
        return 1  # the exit code of an uncaught exception, as before


def _run(args: argparse.Namespace) -> int:
    rank = DistributedConfig.from_env().rank
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    # Only rank 0 reports progress; other ranks speak up for warnings and errors.
    logging.getLogger("geneformer_workflow").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    cfg = compose_config(args.config_name, args.overrides, args.config_dir)
    loss = main(cfg)
    if rank == 0:
        log.info("done: last train loss %s", "n/a" if math.isnan(loss) else f"{loss:.6f}")
    return 0


def _is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is reported in one line (its message names the fix) rather than with a traceback."""
    return isinstance(err, _USER_ERRORS)


def _error_line(err: BaseException) -> str:
    r"""The message on one line, after the class name for this package's own error classes.

    Example:
        >>> _error_line(ValueError("Could not override 'x'.\nTo append use +x=1"))
        "Could not override 'x'. To append use +x=1"
    """
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    # The class name of e.g. CheckpointError or NonFiniteLossError; a SetupError's message says it all.
    own = type(err).__module__.startswith("geneformer_workflow") and not isinstance(err, SetupError)
    return f"{type(err).__name__}: {message}" if own else message
