"""Helpers of the SLURM tier: the test profile, bounded Snakemake runs, and SLURM job records."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..workflow.helpers import REPO, snakemake_env, workflow_command

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"
SHIPPED_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TEST_PROFILE = HERE / "profile" / "config.yaml"


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``, recursively for mappings; a None in ``overrides`` deletes the key."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_test_profile(out_dir: Path) -> Path:
    """The shipped SLURM profile with the test cluster's differences, as ``out_dir/config.yaml``."""
    profile = merge(yaml.safe_load(SHIPPED_PROFILE.read_text()), yaml.safe_load(TEST_PROFILE.read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out_dir


def snakemake_command(workdir: Path, profile: Path, *args: str, timeout: int) -> list[str]:
    """A Snakemake run of the repository's workflow in ``workdir``, killed (with -s KILL) after ``timeout`` s.

    A SLURM executor that cannot get job states waits forever, so every run is bounded from outside.
    """
    return ["timeout", "-s", "KILL", str(timeout), *workflow_command(workdir, "--profile", str(profile), *args)]


def run_snakemake(workdir: Path, profile: Path, *args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    command = snakemake_command(workdir, profile, *args, timeout=timeout)
    return subprocess.run(command, capture_output=True, text=True, env=snakemake_env(), cwd=workdir)


def job_records() -> list[dict[str, str]]:
    """``scontrol show job`` of every job the controller still knows (MinJobAge is 1 h on the test cluster)."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, check=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]


def rule_jobs(rule: str) -> list[dict[str, str]]:
    """Job records of one rule, oldest first (the SLURM executor puts ``rule_<name>`` in the job comment)."""
    jobs = [job for job in job_records() if job.get("Comment", "").startswith(f"rule_{rule}")]
    return sorted(jobs, key=lambda job: int(job["JobId"]))


def wait_for(what: str, condition: Callable[[], Any], *, timeout: float, poll: float = 0.25) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    msg = f"timed out after {timeout:.0f} s waiting for {what}"
    raise AssertionError(msg)


def step_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir`` (saves go to .tmp_step_<n> and are renamed when done)."""
    root = run_dir / "checkpoints"
    return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*")) if root.is_dir() else []


if __name__ == "__main__":
    print(write_test_profile(Path(sys.argv[1])) / "config.yaml")
