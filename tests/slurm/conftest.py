from __future__ import annotations

import os
import subprocess

import pytest

from .helpers import CLUSTER_SH


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM cluster (2 virtual nodes, 2 fake GPUs each) for the session, always torn down by PID afterwards.

    Skips with cluster.sh's reason where the machine cannot host one (not root, no Debian packages).
    """
    command = ["timeout", "-s", "KILL", "300", "bash", str(CLUSTER_SH), "up"]
    up = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GFW_SLURM_FAKE_GPUS": "2"})
    if up.returncode == 77:
        pytest.skip(up.stderr.strip().removeprefix("SKIP: "))
    try:
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield
    finally:
        subprocess.run(["timeout", "-s", "KILL", "120", "bash", str(CLUSTER_SH), "down"], capture_output=True)
