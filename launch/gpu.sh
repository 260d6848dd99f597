#!/usr/bin/env bash
# Train on NVIDIA GPUs through JAX CUDA.
#
# One host, all its GPUs in one process:
#   launch/gpu.sh --config configs/demo.py --workdir runs/demo
# Several hosts, one process each (set the variables yourself on every host; for SLURM use launch/slurm.sh):
#   NNODES=4 NODE_RANK=$i JAX_COORDINATOR_ADDRESS=host0:1234 launch/gpu.sh --config ... --workdir /shared/run
# --dry-run prints the environment it sets and the command, and runs nothing.
#
# With NNODES > 1 (or inside a SLURM job) it sets UNIMM_DISTRIBUTED=1: unimm.distributed then calls
# jax.distributed.initialize(JAX_COORDINATOR_ADDRESS, NNODES, NODE_RANK). PYTHON picks the interpreter.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
PYTHON=${PYTHON:-python3}

source "$here/launch/lib.sh"
parse_args "$@"

"$PYTHON" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('jax') and u.find_spec('flax')))" ||
  run "$PYTHON" -m pip install -q -e ".[gpu]"
setenv XLA_PYTHON_CLIENT_MEM_FRACTION "${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
setenv XLA_FLAGS "${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
if { [ -n "${NNODES:-}" ] && [ "$NNODES" != 1 ]; } || [ -n "${SLURM_JOB_ID:-}" ]; then
  setenv UNIMM_DISTRIBUTED 1
  if $dry; then  # what unimm.distributed will make of the environment (or its one-line error)
    "$PYTHON" -c "import os; from unimm.distributed import cluster_args; from unimm.errors import cli
cli(lambda _: print('# jax.distributed.initialize(**%r)' % (cluster_args(os.environ),)))"
  fi
fi
if $dry; then quote "$PYTHON" -m unimm.train ${args[@]+"${args[@]}"}; exit 0; fi
exec "$PYTHON" -m unimm.train ${args[@]+"${args[@]}"}
