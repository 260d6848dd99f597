#!/usr/bin/env bash
# The train-step benchmark on one bare GPU machine, against the PyTorch peers, in ~8-13 minutes.
#
#   launch/bench_gpu.sh OUTDIR            (or: make bench-gpu OUT=OUTDIR)
#
# Installs what the machine lacks (grain, ml-collections, array-record, portpicker; tokamax for
# the MoE grouped matmul when its wheels are there) from Python 3.12 wheels in .whl/, fetched
# beforehand where a registry answers, e.g.
#   pip download -d .whl --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 grain ml-collections \
#     array-record portpicker [tokamax]
# (drop the wheels of what the machine has: jax, numpy, protobuf, ...), prints nvidia-smi and the
# versions, then runs, each under its own timeout so that one that hangs or fails costs only
# its own time:
#   dense_1b        --peers  (transformers LlamaForCausalLM)
#   moe_2b          --peers  (transformers Qwen3MoeForCausalLM)
#   transfusion_1b  --peers  (packed Shapes batches: no peer, it says so)
#   mmdit_2b        --peers  (diffusers FluxTransformer2DModel; diffusers from .whl/ if missing)
#   --attention              (xla / flash / cudnn, causal and unified masks)
# with BENCH_WARMUP (3) + BENCH_STEPS (10) steps each, and BENCH_ARGS (more flags for the three
# configs, e.g. "--config.model.remat=save_dots"). OUTDIR gets results.jsonl (every JSON
# line), results.md (the tables, with card, versions and date), env.txt (nvidia-smi and
# versions) and one log per run. PYTHON picks the interpreter (default: the machine's
# /opt/torch/.venv/bin/python, which has jax with CUDA, torch and transformers).
set -uo pipefail  # no -e: a failed run is reported and the next one still runs

out=${1:?usage: launch/bench_gpu.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x /opt/torch/.venv/bin/python ]; then py=/opt/torch/.venv/bin/python; else py=python3; fi
fi
warmup=${BENCH_WARMUP:-3}
steps=${BENCH_STEPS:-10}
read -r -a extra <<<"${BENCH_ARGS:-}"

missing=()
for pair in grain:grain ml_collections:ml-collections array_record:array-record portpicker:portpicker; do
  "$py" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
# diffusers (the MMDiT's peer) when its wheel came along
if ! "$py" -c "import diffusers" 2>/dev/null && compgen -G ".whl/diffusers-*.whl" >/dev/null; then
  missing+=(diffusers)
fi
# tokamax (model.moe.impl="auto" on GPU: its grouped matmul) when its wheels came along
if ! "$py" -c "import tokamax" 2>/dev/null && compgen -G ".whl/tokamax-*.whl" >/dev/null; then
  missing+=(tokamax)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from .whl/"
  if [ ! -d .whl ]; then
    echo "error: ${missing[*]} missing and no .whl/: run shared/device/fetch_wheels.sh first" >&2
    exit 1
  fi
  "$py" -m pip install -q --no-index --find-links .whl "${missing[@]}" || exit 1
fi

export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$py" -c 'import sys, jax, jaxlib, flax, optax, torch, transformers
print("python", sys.version.split()[0], "| jax", jax.__version__, "| jaxlib", jaxlib.__version__,
      "| flax", flax.__version__, "| optax", optax.__version__, "| torch", torch.__version__,
      "| transformers", transformers.__version__)
print(jax.devices())'
} 2>&1 | tee "$out/env.txt"

failed=()
run() {  # run NAME SECONDS ARGS...: one benchmark, its log in OUTDIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$py" -m unimm.bench "$@" --out "$out/results.jsonl" >"$out/$name.log" 2>&1
  local rc=$?
  grep '^{' "$out/$name.log" | cut -c1-300
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || { failed+=("$name"); tail -n 5 "$out/$name.log"; }
}

for name in dense_1b moe_2b transfusion_1b mmdit_2b; do
  case $name in
    moe_2b|mmdit_2b) limit=180 ;;
    transfusion_1b) limit=140 ;;
    *) limit=150 ;;
  esac
  run "$name" "$limit" --config "configs/bench/$name.py" --peers --warmup "$warmup" --steps "$steps" \
    "${extra[@]}"
done
run attention 90 --attention

{
  echo "# unimm train-step benchmark"
  echo
  echo "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)," \
       "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ)," \
       "$warmup warm-up + $steps timed steps"
  echo
  [ -s "$out/results.jsonl" ] && "$py" -m unimm.bench --table "$out/results.jsonl"
  [ ${#failed[@]} -eq 0 ] || echo "Failed or timed out: ${failed[*]} (see their logs)."
} >"$out/results.md"
cat "$out/results.md"
[ ${#failed[@]} -eq 0 ]
