#!/usr/bin/env bash
# Train on a TPU slice in a GKE cluster: renders launch/gke/jobset.yaml (one pod per TPU host) and
# applies it with kubectl, or submits the same job with xpk.
#
#   IMAGE=us-docker.pkg.dev/PROJECT/REPO/unimm:v1 TPU_TYPE=v5p-64 launch/gke.sh --build \
#       --config configs/demo.py --config.mesh.fsdp=-1 --workdir gs://bucket/runs/x
#
# Flags (anywhere before `--`; the rest goes to `python -m unimm.train`):
#   --build     build IMAGE from this checkout (python:3.11-slim + `pip install -e '.[tpu]'`) and push it
#   --xpk       submit with `xpk workload create` (CLUSTER, NUM_SLICES, ZONE, PROJECT) instead of kubectl
#   --dry-run   print the manifest and every command, run nothing
# Variables: IMAGE (required), TPU_TYPE (v5p-64), TOPOLOGY (derived from TPU_TYPE for common sizes),
# JOB_NAME (unimm-<time>), NAMESPACE (default), MAX_RESTARTS (0). The rendered manifest is kept
# in OUT_DIR/JOB_NAME.yaml (runs/gke). Logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=JOB_NAME --prefix
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

source "$here/launch/lib.sh"
build=false xpk=false
flag() {
  case $1 in
    --build) build=true ;;
    --xpk) xpk=true ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
json_list() {  # the arguments as a JSON (and so YAML) list of strings
  local out=() a
  for a in "$@"; do a=${a//\\/\\\\}; out+=("\"${a//\"/\\\"}\""); done
  local IFS=,; echo "[${out[*]}]"
}

[ -n "${IMAGE:-}" ] || die "set IMAGE (a container registry path, e.g. us-docker.pkg.dev/PROJECT/REPO/unimm:v1)"
TPU_TYPE=${TPU_TYPE:-v5p-64} JOB_NAME=${JOB_NAME:-unimm-$(date +%m%d-%H%M%S)}
NAMESPACE=${NAMESPACE:-default} MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ $JOB_NAME =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] ||
  die "JOB_NAME=$JOB_NAME: use at most 40 lowercase letters, digits and '-', starting with a letter"
gen=${TPU_TYPE%-*} size=${TPU_TYPE##*-}
[[ $size =~ ^[0-9]+$ ]] || die "TPU_TYPE=$TPU_TYPE: write it as generation-size, e.g. v5p-64, v6e-16"
case $gen in  # v4/v5p sizes count TensorCores (2 a chip), v5e/v6e sizes count chips
  v4) accel=tpu-v4-podslice chips=$((size / 2)) cube=true ;;
  v5p) accel=tpu-v5p-slice chips=$((size / 2)) cube=true ;;
  v5litepod | v5e) accel=tpu-v5-lite-podslice chips=$size cube=false ;;
  v6e) accel=tpu-v6e-slice chips=$size cube=false ;;
  *) die "TPU_TYPE=$TPU_TYPE: known generations are v4, v5p, v5litepod, v6e" ;;
esac
if [ -z "${TOPOLOGY:-}" ]; then
  if $cube; then
    case $chips in 4) TOPOLOGY=2x2x1 ;; 8) TOPOLOGY=2x2x2 ;; 16) TOPOLOGY=2x2x4 ;; 32) TOPOLOGY=2x4x4 ;;
      64) TOPOLOGY=4x4x4 ;; 128) TOPOLOGY=4x4x8 ;; 256) TOPOLOGY=4x8x8 ;; 512) TOPOLOGY=8x8x8 ;; esac
  else
    case $chips in 1) TOPOLOGY=1x1 ;; 4) TOPOLOGY=2x2 ;; 8) TOPOLOGY=2x4 ;; 16) TOPOLOGY=4x4 ;;
      32) TOPOLOGY=4x8 ;; 64) TOPOLOGY=8x8 ;; 128) TOPOLOGY=8x16 ;; 256) TOPOLOGY=16x16 ;; esac
  fi
  [ -n "${TOPOLOGY:-}" ] || die "TPU_TYPE=$TPU_TYPE: set TOPOLOGY (e.g. 4x4x4) for this size"
fi
[[ $TOPOLOGY =~ ^[0-9]+(x[0-9]+)+$ ]] || die "TOPOLOGY=$TOPOLOGY: write it like 2x4x4"
chips=$((${TOPOLOGY//x/*}))
if $cube || [ "$chips" -gt 8 ]; then per_host=4; else per_host=$chips; fi  # 4 chips a host when multi-host
hosts=$((chips / per_host))

workdir_arg
[[ $workdir == gs://* ]] || die "--workdir gs://bucket/path is required: pods share no disk"

if $build; then
  ctx=${OUT_DIR:-runs/gke}/unimm_image_$JOB_NAME  # the build context, beside the rendered manifests
  dockerfile="FROM python:3.11-slim
WORKDIR /app
COPY src.tgz src.tgz
RUN tar -xzf src.tgz && rm src.tgz && pip install --no-cache-dir -e '.[tpu]'"
  run mkdir -p "$ctx"
  pack_checkout "$ctx/src.tgz"
  if $dry; then printf '%s\n' "cat > $ctx/Dockerfile <<'EOF'" "$dockerfile" EOF; else echo "$dockerfile" > "$ctx/Dockerfile"; fi
  run docker build -t "$IMAGE" "$ctx"
  run docker push "$IMAGE"
fi

train=(python3 -m unimm.train ${args[@]+"${args[@]}"})
xpk_cmd=(xpk workload create --cluster="${CLUSTER:-CLUSTER}" --workload="$JOB_NAME" --tpu-type="$TPU_TYPE"
  --num-slices="${NUM_SLICES:-1}" --docker-image="$IMAGE"
  ${ZONE:+--zone="$ZONE"} ${PROJECT:+--project="$PROJECT"}
  --command="cd /app && UNIMM_DISTRIBUTED=1 $(quote "${train[@]}")")
if $xpk; then
  [ -n "${CLUSTER:-}" ] || die "--xpk needs CLUSTER (the xpk/GKE cluster name)"
  run "${xpk_cmd[@]}"
  exit
fi

manifest=$(<launch/gke/jobset.yaml)
for v in JOB_NAME NAMESPACE MAX_RESTARTS HOSTS GKE_ACCELERATOR TOPOLOGY IMAGE TRAIN_ARGS CHIPS_PER_HOST; do
  case $v in
    HOSTS) val=$hosts ;; GKE_ACCELERATOR) val=$accel ;; CHIPS_PER_HOST) val=$per_host ;;
    TRAIN_ARGS) val=$(json_list ${args[@]+"${args[@]}"}) ;;
    *) val=${!v} ;;
  esac
  manifest=${manifest//"\${$v}"/"$val"}
done
file=${OUT_DIR:-runs/gke}/$JOB_NAME.yaml
run mkdir -p "$(dirname "$file")"
if $dry; then printf '%s\n' "# manifest $file:" "$manifest" "# ---"; else echo "$manifest" > "$file"; fi
run kubectl apply -f "$file"
echo "# the same job with xpk (--xpk): $(quote "${xpk_cmd[@]}")"
$dry || echo "logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$JOB_NAME --prefix -n $NAMESPACE"
