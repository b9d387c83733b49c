#!/usr/bin/env bash
# Runs the same training command on every worker of a TPU VM (--worker=all).
#
#   tpu_scripts/launch.sh --name my-tpu --out '$HOME/run1' -- --steps 600
#   tpu_scripts/launch.sh --name my-pod --accelerator-type v5litepod-32 \
#       --out gs://my-bucket/run1 --recipe recipes/prune_int8.yaml
#
# Distributed runtime: train_tpu.py calls jaxopt_dnn.parallel.initialize_distributed()
# with no arguments; on a Cloud TPU VM JAX reads the worker id, the worker count and the
# coordinator (worker 0) from the TPU metadata, so no environment variable is needed.
# Extra variables (e.g. JAX_COMPILATION_CACHE_DIR, XLA flags) go in with --env.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OUT=""
RECIPE=""
BACKGROUND=0
ENVS=()
TRAIN_ARGS=()

usage() {
  cat <<USAGE
usage: $0 [flags] [-- train_tpu.py flags]
Starts train_tpu.py (copied by setup.sh) with the venv's Python on all workers at once;
the output of every worker streams back and is kept in ~/train_tpu.log on each.

$COMMON_USAGE
launch flags:
  --out PATH        checkpoint directory: gs://bucket/path (required on a multi-host
                    slice: every host writes its shards there) or, on a single host, a
                    path on the worker (default \$HOME/jaxopt_run)
  --recipe FILE     a local recipe file (.json/.yaml): copied to every worker and passed
                    to train_tpu.py --recipe
  --env KEY=VALUE   export this variable for the training process (repeatable)
  --background      start with nohup and return at once (follow with: ... ssh
                    --worker=0 --command 'tail -f ~/train_tpu.log')
Anything after -- is passed to train_tpu.py (e.g. -- --steps 2000 --fsdp 4).
USAGE
}

handle_flag() {
  case "$1" in
    --out) OUT="${2:?--out needs a value}"; NSHIFT=2 ;;
    --recipe) RECIPE="${2:?--recipe needs a value}"; NSHIFT=2 ;;
    --env)
      [[ "${2:-}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
        die "--env needs KEY=VALUE (KEY a variable name), got $(quote_arg "${2:-}")"
      ENVS+=("$2"); NSHIFT=2 ;;
    --background) BACKGROUND=1; NSHIFT=1 ;;
    --)
      shift
      TRAIN_ARGS=("$@")
      NSHIFT=$(($# + 1)) ;;
    *) NSHIFT=0 ;;
  esac
}

parse_flags "$@"
location_flags
hosts="$(hosts_for "$TPU_ACCELERATOR")"
OUT="${OUT:-\$HOME/jaxopt_run}"
if ((hosts > 1)) && [[ "$OUT" != gs://* ]]; then
  die "$TPU_ACCELERATOR has $hosts hosts: --out must be a gs:// path that all of them can write"
fi

args=(--out "$OUT")
if [[ -n "$RECIPE" ]]; then
  if [[ ! -f "$RECIPE" ]] && ((!DRY_RUN)); then
    die "recipe file not found: $RECIPE"
  fi
  # The copy on the workers keeps the file's name when it is a plain one; any other name
  # (spaces, quotes, $, ...) is copied as jaxopt_recipe.<ext>, so no remote path needs quoting.
  remote_recipe="$(basename "$RECIPE")"
  if [[ ! "$remote_recipe" =~ ^[A-Za-z0-9_][A-Za-z0-9_.+-]*$ ]]; then
    case "$remote_recipe" in
      *.json) remote_recipe=jaxopt_recipe.json ;;
      *.yaml | *.yml) remote_recipe=jaxopt_recipe.yaml ;;
      *) die "--recipe must be a .json or .yaml file, got $(quote_arg "$RECIPE")" ;;
    esac
  fi
  run gcloud compute tpus tpu-vm scp "$RECIPE" "$TPU_NAME:$remote_recipe" \
    "${LOCATION[@]}" --worker=all
  args+=(--recipe "\$HOME/$remote_recipe")
fi
args+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})

# Every value is quoted for the worker's shell (remote_quote: printf %q); only a leading
# $HOME is left for the worker to expand, on purpose.
quoted=""
for a in "${args[@]}"; do
  quoted+="$(remote_quote "$a") "
done
envs="PYTHONUNBUFFERED=1"
for e in ${ENVS[@]+"${ENVS[@]}"}; do
  envs+=" $(remote_quote "$e")"
done
train="env $envs $(remote_quote "$TPU_VENV/bin/python") \$HOME/train_tpu.py ${quoted% }"
if ((BACKGROUND)); then
  remote="cd \$HOME; nohup $train > \$HOME/train_tpu.log 2>&1 < /dev/null & echo started on \$(hostname)"
else
  remote="$(join_steps "set -o pipefail" "cd \$HOME" "$train 2>&1 | tee \$HOME/train_tpu.log")"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$remote"
