#!/usr/bin/env bash
# Train on NVIDIA GPUs through JAX CUDA.
#
# One host, all its GPUs in one process:
#   launch/gpu.sh --config configs/demo.py --workdir runs/demo
# Several hosts (SLURM, or set the variables yourself on every host):
#   NNODES=4 NODE_RANK=$i JAX_COORDINATOR_ADDRESS=host0:1234 launch/gpu.sh --config ... --workdir /shared/run
#
# With NNODES > 1 it calls jax.distributed.initialize(coordinator, NNODES, NODE_RANK).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
python3 -c "import unimm" 2>/dev/null || python3 -m pip install -q -e ".[gpu]"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [ "${NNODES:-1}" -gt 1 ] || [ -n "${SLURM_JOB_ID:-}" ]; then
  export UNIMM_DISTRIBUTED=1
fi
exec python3 -m unimm.train "$@"
