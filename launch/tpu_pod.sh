#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker, one JAX process per host.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config configs/demo.py \
#       --config.mesh.fsdp=-1 --config.mesh.data=1 --workdir gs://bucket/runs/demo
#
# Every worker gets this checkout (rsync'd by gcloud scp), installs unimm with the TPU extra,
# and runs `python -m unimm.train` with UNIMM_DISTRIBUTED=1, which calls
# jax.distributed.initialize() (auto-discovery on TPU). The workdir must be shared storage
# (GCS) so that Orbax writes one checkpoint for all hosts.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-unimm}
here=$(cd "$(dirname "$0")/.." && pwd)

src=$(mktemp -d)/unimm_src.tgz
tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf "$src" .
gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME":unimm_src.tgz --worker=all --zone="$ZONE" $PROJECT_FLAG
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command "
  set -e; mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf ~/unimm_src.tgz && cd $REPO_DIR &&
  python3 -m pip install -q -e '.[tpu]' &&
  UNIMM_DISTRIBUTED=1 python3 -m unimm.train $args"
