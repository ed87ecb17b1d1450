"""benchmarks/te_acceptance.py: the CPU dry run trains, kills, resumes and writes every key of te_acceptance.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "te_acceptance.py"
KEYS = {"te_version", "pytest_gpu", "fp8_resume", "loss_gap_fp8_vs_bf16", "tokens_per_s", "notes"}


@pytest.mark.slow
def test_dry_run_kills_resumes_exactly_and_writes_the_report(tmp_path):
    command = [sys.executable, str(SCRIPT), "--dry-run", "--steps", "4", "--save-at", "2",
               "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")]  # fmt: skip
    proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "te_acceptance.json").read_text())
    assert KEYS <= report.keys()
    resume = report["fp8_resume"]
    assert resume["killed"] and resume["steps"] == 4 and resume["max_weight_gap"] == 0.0
    assert set(report["tokens_per_s"]) == {"torch_bf16", "te_bf16", "te_fp8"}
    assert report["tokens_per_s"]["torch_bf16"] > 0
    assert report["tokens_per_s"]["te_fp8"] is None and "no Transformer Engine" in report["notes"]["te_fp8"]
