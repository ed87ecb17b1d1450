"""The SLURM support without a cluster: job shapes, the srun decision and the per-node launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from ..workflow.helpers import REPO, run_snakemake, write_config

LAUNCHER = REPO / "workflow" / "scripts" / "torchrun_node.sh"


def pretrain_job_of_dry_run(workdir: Path) -> tuple[dict[str, str], str]:
    """Resources and shell command of pretrain_model in a dry run of the demo config in ``workdir``."""
    result = run_snakemake(workdir, "-n", "-p", "--forceall", "results/pretrain/sanity/final.json")
    assert result.returncode == 0, result.stderr[-3000:]
    block = result.stdout[result.stdout.index("rule pretrain_model:") :]
    resources = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block).group(1)))
    return resources, re.search(r"Shell command: (.*)", block).group(1)


@pytest.mark.parametrize(
    ("pretrain", "expected"),
    [
        ({}, {"nodes": "1", "tasks_per_node": "2", "cpus_per_task": "1", "mem_mb": "8000", "runtime": "60"}),
        (
            {"nodes": 4, "gpus_per_node": 8, "nproc_per_node": 8, "cpus_per_node": 64, "gpu_type": "h100"},
            {"nodes": "4", "gres": "gpu:h100:8", "tasks_per_node": "8", "cpus_per_task": "8"},
        ),
        # as text, the way --config 'pretrain={"nodes": 2, ...}' passes nested values
        ({"nodes": "2", "nproc_per_node": "1", "gpus_per_node": "1"}, {"gres": "gpu:1", "tasks_per_node": "2"}),
    ],
    ids=["sanity-cpu", "4-nodes-typed-gpus", "one-process-per-node"],
)
def test_job_shape_comes_from_the_size_row_and_the_overrides(tmp_path, monkeypatch, pretrain, expected):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_config(tmp_path, pretrain=pretrain)
    resources, _ = pretrain_job_of_dry_run(tmp_path)
    assert resources["mpi"] == "srun"
    assert {key: resources.get(key) for key in expected} == expected
    if not pretrain.get("gpus_per_node"):
        assert "gres" not in resources


def test_pretraining_goes_through_srun_only_inside_a_slurm_job(tmp_path, monkeypatch):
    write_config(tmp_path, pretrain={"nodes": 2, "nproc_per_node": 1})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _, local = pretrain_job_of_dry_run(tmp_path)
    # the SLURM executor's jobs run the rule's shell with SLURM_JOB_ID set
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    _, in_job = pretrain_job_of_dry_run(tmp_path)
    assert "srun" not in local
    assert local.startswith(f"PYTHONPATH={REPO}/workflow/scripts")
    srun = "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=2 --kill-on-bad-exit=1 --label bash"
    assert srun in in_job
    assert f"{LAUNCHER} 2 1 " in in_job


def test_size_rows_of_config_and_schema_defaults_agree():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())["pretrain"]["sizes"]
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    default = schema["properties"]["pretrain"]["properties"]["sizes"]["default"]
    assert config == default
    training_configs = {p.stem for p in (REPO / "config/train").glob("*.yaml")} - {"defaults"}
    assert set(default) == {name for name in training_configs if not name.startswith("_")}


def fake_tools(tmp_path: Path) -> dict[str, str]:
    """A `python` that prints its arguments and its ignored-signal mask, and a `scontrol` for nodes n1, n2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "args: $*"\ngrep SigIgn /proc/self/status\n')
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        'case "$2" in\n'
        '  hostnames) printf "n1\\nn2\\n" ;;\n'
        '  node) echo "NodeName=$3 Arch=x86_64 NodeAddr=10.0.0.$(echo $3 | tr -d n) NodeHostName=$3" ;;\n'
        "esac\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}


def launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(LAUNCHER), *args], capture_output=True, text=True, env=env, timeout=30)


def test_launcher_runs_standalone_torchrun_outside_slurm(tmp_path):
    result = launch(fake_tools(tmp_path), "1", "2", str(tmp_path / "bin/python"), "-m", "geneformer_workflow", "train")
    assert result.returncode == 0, result.stderr
    expected = "args: -m torch.distributed.run --standalone --nproc-per-node 2 -m geneformer_workflow train"
    assert expected in result.stdout


def test_launcher_refuses_several_nodes_outside_slurm(tmp_path):
    result = launch(fake_tools(tmp_path), "2", "1", str(tmp_path / "bin/python"))
    assert result.returncode == 2
    assert "not an srun step" in result.stderr


@pytest.mark.parametrize(("node", "node_id", "is_host"), [("n1", "0", "1"), ("n2", "1", "0")])
def test_launcher_meets_at_the_first_node_of_the_srun_step(tmp_path, node, node_id, is_host):
    env = fake_tools(tmp_path) | {
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODEID": node_id,
        "SLURMD_NODENAME": node,
    }
    result = launch(env, "2", "4", str(tmp_path / "bin/python"), "-m", "geneformer_workflow", "train")
    assert result.returncode == 0, result.stderr
    port = 29500 + 4242 % 2000
    assert (
        "args: -m torch.distributed.run --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d "
        f"--rdzv-endpoint 10.0.0.1:{port} --rdzv-id 4242 --rdzv-conf is_host={is_host} -m geneformer_workflow train"
    ) in result.stdout
    # SIGUSR1 stays ignored in torchrun (the workers install their own handler), so it cannot kill torchrun
    ignored = int(re.search(r"SigIgn:\s*([0-9a-f]+)", result.stdout).group(1), 16)
    assert ignored & (1 << (signal.SIGUSR1 - 1))


def test_launcher_refuses_a_step_with_another_node_count(tmp_path):
    env = fake_tools(tmp_path) | {"SLURM_STEP_NODELIST": "n1", "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_ID": "7"}
    result = launch(env, "2", "1", str(tmp_path / "bin/python"))
    assert result.returncode == 2
    assert "asked for 2 node(s) but the srun step has 1" in result.stderr
