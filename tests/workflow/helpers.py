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


def run_snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run the repository's workflow in ``workdir`` with its config.yaml."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [
        *SNAKEMAKE,
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)
