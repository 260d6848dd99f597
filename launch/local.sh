#!/usr/bin/env bash
# Several JAX processes on this machine, joined into one job: how multi-host runs are tested
# without a pod (CPU devices), or one process per GPU of a host.
#
#   launch/local.sh --processes 2 --devices 4 -- --config configs/demo.py --workdir runs/mh
#   launch/local.sh --processes 8 --gpus -- --config ... --workdir ...   # process i: GPU i
#
# Process i runs `python -m unimm.train ARGS` with UNIMM_DISTRIBUTED=1,
# JAX_COORDINATOR_ADDRESS=localhost:PORT, NNODES=N, NODE_RANK=i (unimm.distributed's
# explicit contract). --devices D gives each process D CPU devices (JAX_PLATFORMS=cpu).
# Process 0 writes to this terminal, process i > 0 to LOGDIR/process_i.log. The exit code is
# the first failing process's. --dry-run prints the commands and runs nothing.
#   --python PY (default: .venv/bin/python if present, else python3)  --port P (default 12355)
#   --logdir DIR (default runs/logs/local)  --module M (default unimm.train)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
processes=2 devices="" gpus=0 port=${UNIMM_COORDINATOR_PORT:-12355} dry=0
logdir=runs/logs/local module=unimm.train
python=$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) processes=$2; shift 2 ;;
    --devices) devices=$2; shift 2 ;;
    --gpus) gpus=1; shift ;;
    --port) port=$2; shift 2 ;;
    --logdir) logdir=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --module) module=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "error: unknown option $1 (options before --, unimm.train's after it)" >&2; exit 2 ;;
  esac
done
case "$processes" in ''|*[!0-9]*|0) echo "error: --processes must be a positive integer, got '$processes'" >&2; exit 2 ;; esac

commands=()
for ((i = 0; i < processes; i++)); do
  env=(UNIMM_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=localhost:$port" "NNODES=$processes" "NODE_RANK=$i")
  if [ -n "$devices" ]; then
    env+=(JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices")
  fi
  [ "$gpus" = 1 ] && env+=("CUDA_VISIBLE_DEVICES=$i")
  cmd="cd $(printf %q "$here") && env$(printf ' %q' "${env[@]}") $(printf %q "$python") -m $module$(printf ' %q' "$@")"
  [ "$i" -gt 0 ] && cmd+=" > $(printf %q "$logdir/process_$i.log") 2>&1"
  commands+=("$cmd")
done

if [ "$dry" = 1 ]; then
  printf '%s &\n' "${commands[@]}"
  echo wait
  exit 0
fi
mkdir -p "$logdir"
pids=()
for cmd in "${commands[@]}"; do
  bash -c "$cmd" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$status" = 0 ] && status=$rc; }
done
[ "$status" = 0 ] || echo "error: a process exited with $status (logs of processes 1..: $logdir)" >&2
exit "$status"
