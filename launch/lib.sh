# shellcheck shell=bash disable=SC2034,SC2154  # sets dry, args and workdir for the script; reads its here
# The helpers that launch/gpu.sh, slurm.sh, tpu_pod.sh and gke.sh share; each sources this file
# from its checkout (`source "$here/launch/lib.sh"`, with `here` the checkout) and then calls
# parse_args "$@". Not a script of its own.

# The script's own flags: `flag FLAG` returns 0 for one it takes (having set its variable) and 1
# for any other. A script with flags of its own redefines it after sourcing this file.
flag() { return 1; }

parse_args() {  # --dry-run sets dry=true, the script's flags go to `flag`, the rest (and all after `--`) to args
  dry=false args=()
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) dry=true ;;
      --) shift; args+=("$@"); break ;;
      *) flag "$1" || args+=("$1") ;;
    esac
    shift
  done
}

die() { echo "error: $*" >&2; exit 2; }

quote() {  # the arguments as one line of shell words
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run() { if $dry; then quote "$@"; else "$@"; fi; }  # the command: printed under --dry-run, else run

setenv() { export "$1=$2"; if $dry; then echo "export $1=$(quote "$2")"; fi; }  # setenv NAME VALUE

workdir_arg() {  # workdir=the value of the train arguments' --workdir (empty without one)
  local i
  workdir=
  for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
      --workdir=*) workdir=${args[i]#--workdir=} ;;
      --workdir) workdir=${args[i + 1]:-} ;;
    esac
  done
}

pack_checkout() {  # pack_checkout FILE: this checkout as a .tgz, without .venv, runs, .git and build debris
  run tar -C "$here" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude=__pycache__ \
    --exclude='*.egg-info' -czf "$1" .
}
