#!/usr/bin/env bash
# Per-node torchrun launcher of the pretraining rule (workflow/rules/pretrain.smk); docs/slurm.md.
#
#   torchrun_node.sh NNODES NPROC_PER_NODE PYTHON ARGS...
#
# runs `PYTHON -m torch.distributed.run ... ARGS` (ARGS: e.g. `-m geneformer_workflow train ...`).
#
# * Inside an srun step with one task per node (the rule runs
#   `srun --nodes=N --ntasks=N --ntasks-per-node=1 ... torchrun_node.sh N P ...`): one torchrun per
#   node; they meet at a c10d rendezvous on the step's first node. The node list comes from
#   SLURM_STEP_NODELIST, which srun sets for every task (Snakemake's job-step executor strips most
#   SLURM_* variables from the rule's own shell, so the rule cannot compute it there).
# * Anywhere else: `torchrun --standalone` on this machine (NNODES must be 1).
#
# Environment: MASTER_PORT overrides the rendezvous port (default 29500 + job id mod 2000, so that jobs
# sharing a first node do not collide; below Linux' ephemeral port range, which starts at 32768).
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 NNODES NPROC_PER_NODE PYTHON ARGS..." >&2
  exit 2
fi
nnodes=$1 nproc=$2 python=$3
shift 3

# SLURM's warning signal before the time limit (sbatch --signal=USR1@<s>, see profiles/slurm/) and
# `scancel --signal=USR1` go to every process of the step. The training workers catch SIGUSR1, save a
# checkpoint and exit 0; torchrun has no handler for it and would die of it (Python's default action),
# taking the workers down mid-save. An ignored signal stays ignored across exec, so torchrun inherits
# the ignore; the workers install their own handler (geneformer_workflow/train/signals.py).
trap '' USR1

if [ -n "${SLURM_STEP_NODELIST:-}" ]; then
  step_nodes=${SLURM_STEP_NUM_NODES:?srun sets SLURM_STEP_NUM_NODES}
  if [ "$step_nodes" != "$nnodes" ]; then
    echo "torchrun_node.sh: asked for $nnodes node(s) but the srun step has $step_nodes ($SLURM_STEP_NODELIST)" >&2
    exit 2
  fi
  head_node=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n 1)
  # The address slurmd is reached at: the host name on most clusters, but test clusters that run several
  # slurmd on one machine give each node its own NodeAddr.
  head_addr=$(scontrol show node "$head_node" -o | grep -oE 'NodeAddr=[^ ]+' | cut -d= -f2)
  port=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 2000))}
  # The first node hosts the rendezvous store. Said explicitly: torchrun's guess compares host names and
  # addresses, which fails on nodes known by several names and picks every node of a one-machine test cluster.
  is_host=0
  [ "${SLURMD_NODENAME:-$(hostname -s)}" = "$head_node" ] && is_host=1
  echo "torchrun_node.sh: node ${SLURMD_NODENAME:-$(hostname -s)} ($((${SLURM_NODEID:-0} + 1))/$nnodes)," \
    "$nproc process(es), rendezvous $head_addr:$port (job $SLURM_JOB_ID)" >&2
  exec "$python" -m torch.distributed.run \
    --nnodes "$nnodes" \
    --nproc-per-node "$nproc" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_addr:$port" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-conf "is_host=$is_host" \
    "$@"
fi

if [ "$nnodes" != 1 ]; then
  echo "torchrun_node.sh: $nnodes nodes requested, but this is not an srun step: run the workflow with" \
    "--profile profiles/slurm, or set pretrain.nodes=1 (docs/slurm.md)" >&2
  exit 2
fi
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$@"
