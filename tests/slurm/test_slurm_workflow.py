"""The workflow on a real SLURM cluster (tests/slurm/cluster.sh: 2 virtual nodes on this machine).

Runs through the shipped profile (profiles/slurm) with the test cluster's differences
(tests/slurm/profile): the demo data with a 2-node x 1-process CPU pretraining; then a 1-node
pretraining with a GPU request (fake GPUs; training stays on CPU) that is stopped and requeued and
resumes from its checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch

from ..workflow.helpers import write_config
from .helpers import (
    rule_jobs,
    run_snakemake,
    snakemake_command,
    snakemake_env,
    step_checkpoints,
    wait_for,
    write_test_profile,
)

pytestmark = pytest.mark.slurm

EXPORT = "results/export/sanity"
# Two nodes with one torchrun process each: the same world size (2) and global batch as the local runs.
PRETRAIN = {"nodes": 2, "nproc_per_node": 1}
# One node, two processes and two (fake) GPUs: the one-node path and the GRES request.
PRETRAIN_GPU = {"nodes": 1, "nproc_per_node": 2, "gpus_per_node": 2}
RULES = ("qc_dataset", "compute_gene_medians", "build_vocabulary", "tokenize_dataset", "store_index")


def output_tail(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout or "")[-6000:] + (result.stderr or "")[-6000:]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return write_test_profile(tmp_path_factory.mktemp("profile"))


@pytest.fixture(scope="module")
def slurm_demo(slurm_cluster, profile, tmp_path_factory):
    """The demo data up to the exported model, every step a SLURM job (about 2.5 minutes)."""
    workdir = tmp_path_factory.mktemp("slurm-demo")
    write_config(workdir, pretrain={**PRETRAIN, "overrides": ["training.max_steps=6", "checkpoint.save_every=3"]})
    result = run_snakemake(workdir, profile, EXPORT, timeout=480)
    assert result.returncode == 0, output_tail(result)
    return workdir


def test_every_step_runs_as_a_slurm_job_and_the_export_loads(slurm_demo):
    from transformers import BertForMaskedLM

    for rule in (*RULES, "pretrain_model", "export_model"):
        jobs = rule_jobs(rule)
        assert jobs, f"no SLURM job of {rule}"
        assert jobs[-1]["JobState"] == "COMPLETED", jobs[-1]
    final = json.loads((slurm_demo / "results/pretrain/sanity/final.json").read_text())
    assert final["step"] == 6
    model = BertForMaskedLM.from_pretrained(slurm_demo / EXPORT)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_pretraining_starts_torchrun_on_both_nodes_through_srun(slurm_demo):
    job = rule_jobs("pretrain_model")[-1]
    assert (job["NumNodes"], job["NodeList"]) == ("2", "n[1-2]")
    slurm_log = slurm_demo / f".snakemake/slurm_logs/rule_pretrain_model/sanity/{job['JobId']}.log"
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=2" in slurm_log.read_text()
    log = (slurm_demo / "logs/pretrain_model/sanity.log").read_text()
    # srun --label: "<task>: " before each line; one task per node, each starting one torchrun
    assert "0: torchrun_node.sh: node n1 (1/2), 1 process(es), rendezvous 127.0.0.1:" in log
    assert "1: torchrun_node.sh: node n2 (2/2), 1 process(es), rendezvous 127.0.0.1:" in log


def test_rerun_through_the_profile_has_nothing_to_do(slurm_demo, profile):
    result = run_snakemake(slurm_demo, profile, "-n", EXPORT, timeout=180)
    assert result.returncode == 0, output_tail(result)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_stopped_and_requeued_pretraining_resumes_from_its_checkpoints(slurm_demo, profile, tmp_path):
    # The corpus of the demo run, without its model: only pretraining (30 steps) and export run here.
    shutil.copytree(slurm_demo / "results", tmp_path / "results", ignore=shutil.ignore_patterns("pretrain", "export"))
    write_config(
        tmp_path, pretrain={**PRETRAIN_GPU, "overrides": ["training.max_steps=30", "checkpoint.save_every=3"]}
    )
    run_dir = tmp_path / "results/pretrain/sanity"
    earlier = {job["JobId"] for job in rule_jobs("pretrain_model")}

    def pretrain_job(state: str, *, besides: tuple[str, ...] = ()) -> str | None:
        ids = [j["JobId"] for j in rule_jobs("pretrain_model") if j["JobState"] == state]
        new = [i for i in ids if i not in earlier and i not in besides]
        return new[-1] if new else None

    def state(job_id: str) -> str:
        return next(j for j in rule_jobs("pretrain_model") if j["JobId"] == job_id)["JobState"]

    command = snakemake_command(tmp_path, profile, EXPORT, timeout=480)
    log = tmp_path / "snakemake.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=snakemake_env(), cwd=tmp_path,
                                start_new_session=True)  # fmt: skip
    try:
        # 1. Time limit: the profile asks for SIGUSR1 before it (sbatch --signal=USR1@180, no "B:"), which
        #    SLURM sends to the job's steps but not to its batch shell; scancel --signal=USR1 sends it the
        #    same way, now. The workers checkpoint and exit; the rule fails on purpose; Snakemake retries.
        first = wait_for("a running pretraining job", lambda: pretrain_job("RUNNING"), timeout=240)
        wait_for("its first checkpoint", lambda: step_checkpoints(run_dir), timeout=240)
        subprocess.run(["scancel", "--signal=USR1", first], check=True)
        wait_for("the stopped job to fail", lambda: state(first) == "FAILED", timeout=120)
        stopped_at = max(step_checkpoints(run_dir))
        assert stopped_at < 30
        # 2. Preemption / node failure: SLURM requeues the retry (same job id; SIGTERM to all its processes).
        second = wait_for("the retry", lambda: pretrain_job("RUNNING", besides=(first,)), timeout=240)
        wait_for("a checkpoint of the retry", lambda: max(step_checkpoints(run_dir)) > stopped_at, timeout=240)
        subprocess.run(["scontrol", "requeue", second], check=True)
        # SLURM holds a requeued job for about 2 minutes (BeginTime); release it at once.
        wait_for("the requeued job to pend", lambda: state(second) == "PENDING", timeout=120)
        subprocess.run(["scontrol", "update", f"jobid={second}", "StartTime=now"], check=True)
        returncode = proc.wait(timeout=480)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert returncode == 0, log.read_text()[-6000:]

    jobs = {j["JobId"]: j for j in rule_jobs("pretrain_model")}
    assert jobs[first]["JobState"] == "FAILED"
    assert (jobs[second]["JobState"], jobs[second]["Restarts"]) == ("COMPLETED", "1")
    assert (jobs[second]["NumNodes"], jobs[second]["TresPerNode"]) == ("1", "gres:gpu:2")
    first_log = tmp_path / f".snakemake/slurm_logs/rule_pretrain_model/sanity/{first}.log"
    assert re.search(r"^pretrain_model: stopped before training.max_steps", first_log.read_text(), re.M)
    assert json.loads((run_dir / "final.json").read_text())["step"] == 30
    log = (tmp_path / "logs/pretrain_model/sanity.log").read_text()
    assert re.search(rf"^torchrun_node.sh: node n[12] \(1/1\), 2 process\(es\), .*\(job {second}\)$", log, re.M)
    assert "resumed from" in log
    # Each attempt drops the metrics lines after its checkpoint, so every step is logged once, in order.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 30
