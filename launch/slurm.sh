#!/usr/bin/env bash
#SBATCH --job-name=unimm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
# Train on several GPU nodes under SLURM: one JAX process per node, each using all its GPUs.
#
# From a login node (in the environment that has unimm installed; it is passed on to the job):
#   NODES=4 GPUS_PER_NODE=8 PARTITION=gpu TIME=12:00:00 launch/slurm.sh --config configs/demo.py --workdir /shared/runs/x
# or submit it yourself: sbatch -N 4 --gpus-per-node=8 launch/slurm.sh --config ... --workdir /shared/runs/x
# --dry-run prints the sbatch command, then the environment and srun command of the job, and runs nothing.
#
# Variables: NODES (2), GPUS_PER_NODE (8; empty: ask for none), PARTITION, ACCOUNT, TIME, QOS; PYTHON (python3);
# LOG_DIR (runs/logs);
# UNIMM_COORDINATOR_PORT (default: derived from the job id); NCCL_* and XLA_FLAGS are passed on.
# Inside the job, srun starts `python -m unimm.train` on every node with UNIMM_DISTRIBUTED=1;
# unimm.distributed takes the coordinator (first node), process count and rank from SLURM's variables.
# The job's output, each line prefixed by its node's rank, goes to LOG_DIR/slurm-<jobid>.out.
set -euo pipefail
PYTHON=${PYTHON:-python3}

checkout() {  # inside the job: the checkout the submission passed as UNIMM_DIR (else the working directory)
  here=${UNIMM_DIR:-$PWD}
  [ -d "$here/unimm" ] || { echo "error: $here is not the unimm checkout: set UNIMM_DIR" >&2; exit 2; }
}
# Inside the job $0 is SLURM's copy of this script, away from the checkout and its launch/lib.sh.
if [ -n "${SLURM_JOB_ID:-}" ]; then checkout; else here=$(cd "$(dirname "$0")/.." && pwd); fi
source "$here/launch/lib.sh"
parse_args "$@"

in_job() {  # the batch step: set up the environment, one process per node
  checkout
  cd "$here"
  setenv UNIMM_DISTRIBUTED 1
  setenv XLA_PYTHON_CLIENT_MEM_FRACTION "${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  setenv XLA_FLAGS "${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
  setenv NCCL_DEBUG "${NCCL_DEBUG:-WARN}"  # INFO shows which network NCCL picked
  # a failed node fails the job fast instead of leaving the others waiting in a collective
  run srun --ntasks-per-node=1 --kill-on-bad-exit=1 --label \
    "$PYTHON" -m unimm.train ${args[@]+"${args[@]}"}
}

if [ -n "${SLURM_JOB_ID:-}" ]; then
  in_job
  exit
fi

log_dir=${LOG_DIR:-$here/runs/logs}
gpus=${GPUS_PER_NODE-8}  # GPUS_PER_NODE= (empty) leaves GPUs to your own sbatch options / #SBATCH lines
sbatch=(sbatch --nodes="${NODES:-2}" --ntasks-per-node=1 ${gpus:+--gpus-per-node="$gpus"} --exclusive
  --job-name=unimm --chdir="$here" --output="$log_dir/slurm-%j.out" --export=ALL,UNIMM_DIR="$here"
  ${PARTITION:+--partition="$PARTITION"} ${ACCOUNT:+--account="$ACCOUNT"} ${TIME:+--time="$TIME"}
  ${QOS:+--qos="$QOS"} "$here/launch/slurm.sh" ${args[@]+"${args[@]}"})
run mkdir -p "$log_dir"
run "${sbatch[@]}"
if $dry; then
  echo "# in the job:"
  (UNIMM_DIR=$here; in_job)
fi
