#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every worker, one JAX process per host.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a ACCELERATOR=v5p-64 launch/tpu_pod.sh --create \
#       --config configs/demo.py --config.mesh.fsdp=-1 --config.mesh.data=1 --workdir gs://bucket/runs/demo
#
# Flags (anywhere before `--`; the rest goes to `python -m unimm.train`):
#   --reuse     use the existing TPU VM TPU_NAME (default)
#   --create    create it first: `tpu-vm create`, or with --queued a queued resource (waits for ACTIVE)
#   --spot      Spot capacity (with --create)
#   --dry-run   print every command it would run, run nothing
# Variables: TPU_NAME, ZONE (required); PROJECT; ACCELERATOR (required with --create; also gives the
# worker count, else WORKERS); RUNTIME_VERSION (default by TPU generation); REPO_DIR (unimm);
# LOG_DIR (runs/logs/$TPU_NAME).
#
# Every worker gets this checkout, installs it (`pip install -e '.[tpu]'` into ~/unimm-venv on
# Python >= 3.11) and runs `python -m unimm.train` with UNIMM_DISTRIBUTED=1, which calls
# jax.distributed.initialize() (auto-detected on TPU). Each worker's output comes back to
# LOG_DIR/worker-N.log. The workdir must be shared storage (gs://) so that all hosts write one
# checkpoint.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

source "$here/launch/lib.sh"
mode=reuse spot=false queued=false
flag() {
  case $1 in
    --create) mode=create ;;
    --reuse) mode=reuse ;;
    --spot) spot=true ;;
    --queued) queued=true ;;
    *) return 1 ;;
  esac
}
parse_args "$@"

[ -n "${TPU_NAME:-}" ] || die "set TPU_NAME (the TPU VM to create or reuse)"
[ -n "${ZONE:-}" ] || die "set ZONE (e.g. us-east5-a)"
REPO_DIR=${REPO_DIR:-unimm}
[[ $REPO_DIR =~ ^[A-Za-z0-9_.-]+$ ]] || die "REPO_DIR=$REPO_DIR: use a plain directory name"
LOG_DIR=${LOG_DIR:-runs/logs/$TPU_NAME}
ACCELERATOR=${ACCELERATOR:-}
gen=${ACCELERATOR%-*} size=${ACCELERATOR##*-}
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

if [ -z "${WORKERS:-}" ] && [ -n "$ACCELERATOR" ] && [[ $size =~ ^[0-9]+$ ]]; then
  case $gen in  # hosts of a slice: v2-v5p count TensorCores (8 a host), v5e/v6e count chips (4 a host)
    v2 | v3 | v4 | v5p) WORKERS=$(( size > 8 ? size / 8 : 1 )) ;;
    v5litepod | v5e | v6e) WORKERS=$(( size > 8 ? size / 4 : 1 )) ;;
  esac
fi
[[ ${WORKERS:-} =~ ^[1-9][0-9]*$ ]] || die "set ACCELERATOR (e.g. v5p-64) or WORKERS (the TPU VM's host count)"
workdir_arg
[ -n "$workdir" ] || die "--workdir is required (gs://bucket/path, shared by all workers)"
if [ "$WORKERS" -gt 1 ] && [[ $workdir != gs://* ]]; then
  die "--workdir $workdir: $WORKERS workers need shared storage, e.g. --workdir gs://bucket/runs/x"
fi

if [ "$mode" = create ]; then
  [ -n "$ACCELERATOR" ] || die "--create needs ACCELERATOR (e.g. v5p-64)"
  case $gen in
    v5p) default_version=v2-alpha-tpuv5 ;;
    v5litepod | v5e) default_version=v2-alpha-tpuv5-lite ;;
    v6e) default_version=v2-alpha-tpuv6e ;;
    *) default_version=tpu-ubuntu2204-base ;;
  esac
  version=${RUNTIME_VERSION:-$default_version}
  capacity=(); if $spot; then capacity=(--spot); fi
  if $queued; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$version" ${capacity[@]+"${capacity[@]}"}
    poll=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format='value(state.state)')
    if $dry; then
      echo "# every 60 s until it prints ACTIVE:"; quote "${poll[@]}"
    else
      while s=$("${poll[@]}"); [ "$s" != ACTIVE ]; do
        case $s in FAILED | SUSPENDED) die "queued resource $TPU_NAME is $s" ;; esac
        echo "queued resource $TPU_NAME: $s; waiting"; sleep 60
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$version" ${capacity[@]+"${capacity[@]}"}
  fi
else
  check=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='value(state)')
  if $dry; then
    echo "# must print READY:"; quote "${check[@]}"
  else
    state=$("${check[@]}") || die "no TPU VM $TPU_NAME in $ZONE: create it with --create (and ACCELERATOR)"
    [ "$state" = READY ] || die "TPU VM $TPU_NAME is $state, not READY"
  fi
fi

src=${TMPDIR:-/tmp}/unimm_src_$TPU_NAME.tgz
pack_checkout "$src"
run gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME":unimm_src.tgz --worker=all "${where[@]}"
# Python >= 3.11 (setup.py): the TPU images ship 3.10, so install 3.11 from apt where needed.
remote="set -euo pipefail; mkdir -p $REPO_DIR; tar -C $REPO_DIR -xzf unimm_src.tgz; cd $REPO_DIR; "
remote+='py=python3; python3 -c "import sys; sys.exit(sys.version_info < (3, 11))" || { py=python3.11; '
remote+='command -v python3.11 >/dev/null || { sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive '
remote+='apt-get -qq install -y python3.11 python3.11-venv; }; }; '
remote+='[ -x ~/unimm-venv/bin/python ] || $py -m venv ~/unimm-venv; '
remote+="~/unimm-venv/bin/python -m pip install -q -e '.[tpu]'; "
remote+="UNIMM_DISTRIBUTED=1 ~/unimm-venv/bin/python -m unimm.train $(quote ${args[@]+"${args[@]}"}) 2>&1 | tee train.log"
rc=0
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$remote" || rc=$?
run mkdir -p "$LOG_DIR"
for ((w = 0; w < WORKERS; w++)); do
  run gcloud compute tpus tpu-vm scp "$TPU_NAME":"$REPO_DIR"/train.log "$LOG_DIR/worker-$w.log" \
    --worker="$w" "${where[@]}" || echo "warning: no log from worker $w" >&2
done
$dry || echo "logs: $LOG_DIR/worker-*.log (exit status $rc)"
exit $rc
