"""Rank, world size and the process group, read from the environment that ``torchrun`` sets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedConfig:
    """Where this process sits in the job.

    ``torchrun`` (and ``python -m torch.distributed.run``) set ``RANK``, ``LOCAL_RANK`` and
    ``WORLD_SIZE``; a plain ``python`` process gets the single-process defaults.

    Example:
        >>> DistributedConfig.from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
        DistributedConfig(rank=1, local_rank=1, world_size=2)
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DistributedConfig:
        """Read ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (defaults 0, 0, 1)."""
        env = os.environ if environ is None else environ
        config = cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
        )
        if not 0 <= config.rank < config.world_size:
            msg = (
                f"RANK={config.rank} is outside [0, WORLD_SIZE={config.world_size}); check the launcher's environment"
            )
            raise ValueError(msg)
        return config

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the only rank that writes logs, metrics and exports."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


@dataclass(frozen=True)
class Runtime:
    """The device and process group this process trains with."""

    dist: DistributedConfig
    device: torch.device
    backend: str | None = field(default=None)  # "gloo" / "nccl", or None without a process group

    @property
    def has_process_group(self) -> bool:
        """True when a ``torch.distributed`` process group is initialised."""
        return self.backend is not None


def select_device(requested: str, dist_config: DistributedConfig) -> torch.device:
    """Map ``training.device`` (``auto``/``cpu``/``cuda``) to this rank's device."""
    if requested not in {"auto", "cpu", "cuda"}:
        msg = f"training.device={requested!r} is not one of auto, cpu, cuda"
        raise ValueError(msg)
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        msg = "training.device=cuda but no CUDA device is visible; set training.device=auto or cpu"
        raise ValueError(msg)
    if use_cuda:
        torch.cuda.set_device(dist_config.local_rank)
        return torch.device("cuda", dist_config.local_rank)
    return torch.device("cpu")


def init_runtime(requested_device: str, *, timeout_s: float = 1800.0) -> Runtime:
    """Pick the device and, for more than one process, start the process group.

    gloo on CPU, NCCL on GPU. A single process gets no process group at all, so tests and
    one-CPU runs need no rendezvous.
    """
    dist_config = DistributedConfig.from_env()
    device = select_device(requested_device, dist_config)
    if not dist_config.is_distributed:
        return Runtime(dist=dist_config, device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return Runtime(dist=dist_config, device=device, backend=backend)


def close_runtime(runtime: Runtime) -> None:
    """Destroy the process group if this process started one."""
    if runtime.has_process_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    """Wait for every rank (no-op for a single process)."""
    if runtime.has_process_group:
        if runtime.device.type == "cuda":
            dist.barrier(device_ids=[runtime.device.index])
        else:
            dist.barrier()


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum a few float64 scalars over ranks (one collective); identity for one process."""
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    if runtime.has_process_group:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
