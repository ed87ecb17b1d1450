from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "resources" / "demo" / "pbmc_5k_protein_v3.h5ad"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def write_config(workdir: Path, **overrides: object) -> Path:
    """A config file in ``workdir`` for the demo data, with top-level ``overrides``."""
    config = {"inputs": [str(DEMO)], "model": "sanity", **overrides}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake_env() -> dict[str, str]:
    """The environment of test runs: no wandb, one thread per process."""
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def workflow_command(workdir: Path, *args: str) -> list[str]:
    """A Snakemake command running the repository's workflow in ``workdir`` with its config.yaml."""
    return [
        *SNAKEMAKE,
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]


def run_snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run the repository's workflow in ``workdir`` with its config.yaml."""
    command = workflow_command(workdir, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=snakemake_env(), cwd=workdir)
