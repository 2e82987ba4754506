#!/bin/bash
# SLURM: one align stage on several machines, one `accelerate launch` per machine (srun runs one task per node).
# Usage: sbatch --nodes=2 stages/accelerate/slurm.sh sft stages/sft.yaml [key=value ...]
# Each node's launcher gets its --machine_rank from SLURM_NODEID; the first node of the job is the main process.
# The run folder (output_dir) should be on a filesystem every node sees.
#SBATCH --job-name=align
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=align-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-stages/accelerate/multinode.yaml}   # or a multi-node copy of fsdp.yaml / zero3.yaml
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)   # sed reads all: no SIGPIPE under pipefail
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

export ACCELERATE CONFIG MAIN_IP MAIN_PORT NUM_PROCESSES
# Single quotes: $SLURM_NODEID is expanded on each node, not here; "$@" passes the stage arguments unchanged.
srun --kill-on-bad-exit=1 bash -c '"$ACCELERATE" launch --config_file "$CONFIG" \
  --num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
  -m align.cli "$@"' align-launch "$@"
