"""The workflow's pretraining job: the training config's name, the job's shape and launch, the trainer's overrides.

Job shape: the model size's row of ``pretrain.sizes`` in the workflow config, then every ``pretrain.<key>`` that is
set (docs/slurm.md). Launch: ``srun`` starts one ``torchrun`` per node inside a SLURM job; on one machine torchrun
runs ``--standalone``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "PRETRAIN_SHAPE_KEYS",
    "check_model_config",
    "hydra_quote",
    "pretrain_job",
    "pretrain_launch",
    "pretrain_overrides",
    "use_srun",
]

PRETRAIN_SHAPE_KEYS = ("nodes", "gpus_per_node", "nproc_per_node", "cpus_per_node", "mem_mb", "runtime")


def check_model_config(name: str, train_config_dir: Path) -> str:
    """``name`` when ``train_config_dir`` holds its training config (``<name>.yaml``), else a clear error."""
    available = sorted(
        p.stem for p in train_config_dir.glob("*.yaml") if p.stem != "defaults" and not p.stem.startswith("_")
    )
    if name not in available:
        msg = f"config 'model': unknown model {name!r}; choose one of {available} (config/train/)"
        raise ValueError(msg)
    return name


def pretrain_job(pretrain: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Job shape of the pretraining rule: the model size's row of ``pretrain.sizes``, then every ``pretrain.<key>``.

    Raises:
        ValueError: a shape key that neither the size's row nor ``pretrain`` sets.
    """
    job = dict(pretrain["sizes"].get(model, {}))
    # int(): --config 'pretrain={"nodes": 2}' passes nested values as text (the schema allows digits only)
    job.update({key: int(pretrain[key]) for key in PRETRAIN_SHAPE_KEYS if pretrain.get(key) is not None})
    missing = [f"pretrain.{key}" for key in PRETRAIN_SHAPE_KEYS if job.get(key) is None]
    if missing:
        msg = f"config 'pretrain': no job shape for model {model!r}: add pretrain.sizes.{model} or set {missing}"
        raise ValueError(msg)
    # SLURM task slots per node: one per torchrun process, but at least 2, because the SLURM executor
    # plugin refuses srun-launched ("mpi") jobs with one task per node. They only size the allocation:
    # the training step is one task per node holding all of the node's CPUs (pretrain_launch).
    job["tasks_per_node"] = max(job["nproc_per_node"], 2)
    job["cpus_per_task"] = -(-job["cpus_per_node"] // job["tasks_per_node"])
    gpu_type = pretrain.get("gpu_type")
    gpus = job["gpus_per_node"]
    # Per node, as sbatch --gres expects; None = no GRES request (CPU training).
    job["gres"] = (f"gpu:{gpu_type}:{gpus}" if gpu_type else f"gpu:{gpus}") if gpus else None
    return job


def use_srun(pretrain: Mapping[str, Any], environ: Mapping[str, str]) -> bool:
    """Start torchrun through srun: launcher=srun, or launcher=auto inside a SLURM job (a SLURM executor job)."""
    launcher = pretrain["launcher"]
    return launcher == "srun" or (launcher == "auto" and "SLURM_JOB_ID" in environ)


def pretrain_launch(pretrain: Mapping[str, Any], resources: Any, environ: Mapping[str, str]) -> str:
    """srun that starts torchrun_node.sh once per node of the job; empty on one machine (torchrun --standalone).

    ``resources`` is the job's (Snakemake's ``resources``: attributes ``nodes``, ``tasks_per_node``,
    ``cpus_per_task`` and the mapping method ``get``).
    """
    if not use_srun(pretrain, environ):
        return ""
    options = [
        f"--nodes={resources.nodes}",
        f"--ntasks={resources.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={resources.tasks_per_node * resources.cpus_per_task}",
        "--kill-on-bad-exit=1",  # one node failing stops the others instead of leaving them in a collective
    ]
    if resources.get("gres"):
        options.append(f"--gres={resources.gres}")
    if resources.nodes > 1:
        options.append("--label")  # prefix each log line with the task (= node) number
    return "srun " + " ".join(options)


def hydra_quote(value: object) -> str:
    """A Hydra override value as a quoted string, so paths with spaces, commas or '=' stay one value."""
    text = str(value)
    if "'" in text or "\\" in text:
        msg = f"the path {text!r} contains a quote or backslash, which cannot be passed to the trainer"
        raise ValueError(msg)
    return f"'{text}'"


def pretrain_overrides(store: str, vocab_dir: str, run_dir: str, extra: list[str]) -> list[str]:
    """The Hydra overrides of the pretraining job, ``extra`` (``pretrain.overrides``) last.

    The corpus reaches the trainer as one path, the training store's index, whatever its number of shards; the
    tokens per cell come from the vocabulary (``data.max_length: null``).
    """
    return [
        f"data.store={hydra_quote(store)}",
        f"data.vocab_dir={hydra_quote(vocab_dir)}",
        f"run_dir={hydra_quote(run_dir)}",
        *extra,
    ]
