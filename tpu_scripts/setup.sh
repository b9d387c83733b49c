#!/usr/bin/env bash
# Installs jax[tpu] and jaxopt_dnn on every worker of a TPU VM, and copies train_tpu.py.
#
#   tpu_scripts/setup.sh --name my-tpu --zone us-west4-a     # this checkout, as a wheel
#   tpu_scripts/setup.sh --name my-tpu --git https://github.com/<owner>/jaxopt_dnn --ref v0.1
#   tpu_scripts/setup.sh --name my-tpu --wheel dist/jaxopt_dnn-0.1.0-py3-none-any.whl
#
# JAX needs Python >= 3.11 and the TPU VM images ship an older one, so each worker gets a
# uv-managed Python in a virtual environment ($TPU_VENV, default $HOME/jaxopt_venv).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WHEEL=""
GIT=""
REF=""
PYTHON_VERSION="3.12"
EXTRA_PIP=()

usage() {
  cat <<USAGE
usage: $0 [flags]
On every worker (--worker=all): creates the venv $TPU_VENV with Python \$PYTHON_VERSION,
installs jax[tpu], gcsfs (gs:// checkpoints) and jaxopt_dnn, then copies
tpu_scripts/train_tpu.py to the worker's home directory.

$COMMON_USAGE
setup flags:
  --source SPEC       where jaxopt_dnn comes from [\$JAXOPT_DNN_SOURCE, default: this
                      checkout, $JAXOPT_DNN_SOURCE]: a checkout directory (built into
                      a wheel with pip wheel --no-deps, then copied with scp), a wheel
                      file (copied), or a pip requirement the workers install as is
                      (git+https://github.com/<owner>/jaxopt_dnn@<ref>)
  --git URL           install jaxopt_dnn from this git repository
  --ref REF           with --git: the branch, tag or commit (default: the default branch)
  --wheel FILE        install a locally built wheel (copied with scp); build it
                      with: python -m pip wheel --no-deps -w dist .
  --python VERSION    Python version of the worker venv (default 3.12)
  --pip SPEC          an extra pip requirement to install (repeatable)
USAGE
}

handle_flag() {
  case "$1" in
    --source) JAXOPT_DNN_SOURCE="${2:?--source needs a value}"; NSHIFT=2 ;;
    --git) GIT="${2:?--git needs a value}"; NSHIFT=2 ;;
    --ref) REF="${2:?--ref needs a value}"; NSHIFT=2 ;;
    --wheel) WHEEL="${2:?--wheel needs a value}"; NSHIFT=2 ;;
    --python) PYTHON_VERSION="${2:?--python needs a value}"; NSHIFT=2 ;;
    --pip) EXTRA_PIP+=("${2:?--pip needs a value}"); NSHIFT=2 ;;
    *) NSHIFT=0 ;;
  esac
}

parse_flags "$@"
location_flags
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

[[ -z "$REF" || -n "$GIT" ]] || die "--ref needs --git URL (the repository to check out)"
if [[ -z "$WHEEL" && -z "$GIT" ]]; then
  if [[ -d "$JAXOPT_DNN_SOURCE" ]]; then   # a checkout: build its wheel here
    [[ -f "$JAXOPT_DNN_SOURCE/pyproject.toml" ]] ||
      die "JAXOPT_DNN_SOURCE: $(quote_arg "$JAXOPT_DNN_SOURCE") has no pyproject.toml"
    version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$JAXOPT_DNN_SOURCE/pyproject.toml" | head -n 1)"
    [[ -n "$version" ]] || die "no version in $JAXOPT_DNN_SOURCE/pyproject.toml"
    run python3 -m pip wheel --quiet --no-deps -w "$JAXOPT_DNN_SOURCE/dist" "$JAXOPT_DNN_SOURCE"
    WHEEL="$JAXOPT_DNN_SOURCE/dist/jaxopt_dnn-$version-py3-none-any.whl"
  elif [[ "$JAXOPT_DNN_SOURCE" == *.whl ]]; then
    WHEEL="$JAXOPT_DNN_SOURCE"
  fi
fi
if [[ -n "$WHEEL" ]]; then
  if [[ ! -f "$WHEEL" ]] && ((!DRY_RUN)); then
    die "wheel not found: $WHEEL"
  fi
  # pip needs the wheel's own file name, which is plain (name-version-tags.whl).
  [[ "$(basename "$WHEEL")" =~ ^[A-Za-z0-9_][A-Za-z0-9_.+!-]*\.whl$ ]] ||
    die "--wheel must be a wheel file named NAME-VERSION-TAGS.whl, got $(quote_arg "$WHEEL")"
  run gcloud compute tpus tpu-vm scp "$WHEEL" "$TPU_NAME:" "${LOCATION[@]}" --worker=all
  package="\$HOME/$(basename "$WHEEL")[app]"   # with the app extra: train_tpu.py's data
elif [[ -n "$GIT" ]]; then
  package="jaxopt-dnn[app] @ git+$GIT${REF:+@$REF}"
else
  package="$JAXOPT_DNN_SOURCE"   # a requirement the workers' pip resolves
fi
run gcloud compute tpus tpu-vm scp "$here/train_tpu.py" "$TPU_NAME:train_tpu.py" \
  "${LOCATION[@]}" --worker=all

# The command each worker runs (its own bash). Every value is quoted for it with
# remote_quote (printf %q); only a leading $HOME (the wheel's path, the default $TPU_VENV)
# is left for the worker to expand, on purpose.
pip_args=("jax[tpu]" "gcsfs" "$package" ${EXTRA_PIP[@]+"${EXTRA_PIP[@]}"})
quoted=""
for a in "${pip_args[@]}"; do
  quoted+="$(remote_quote "$a") "
done
venv="$(remote_quote "$TPU_VENV")"
py="$(remote_quote "$TPU_VENV/bin/python")"
steps=(
  "set -euo pipefail"
  "python3 -m pip install --user --quiet --upgrade uv"
  "UV=\$HOME/.local/bin/uv"
  "if [ ! -x $py ]; then \$UV venv --python $(remote_quote "$PYTHON_VERSION") $venv; fi"
  "\$UV pip install --python $py --upgrade ${quoted% }"
  "$py -c 'import jax, jaxopt_dnn; print(\"worker ready: jax\", jax.__version__, \"jaxopt_dnn\", jaxopt_dnn.__version__)'"
)
remote="$(join_steps "${steps[@]}")"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$remote"
