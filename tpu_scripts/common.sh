# shellcheck shell=bash
# Shared flag parsing and command runner for the Cloud TPU scripts (sourced, not run).
#
# Every script accepts the common flags below (environment variables give defaults) and
# --dry-run, which prints each command, shell-quoted and copy-pastable, instead of
# running it. Script-specific flags are handled by the caller's `handle_flag` function.

TPU_NAME="${TPU_NAME:-jaxopt-dnn}"
TPU_ZONE="${TPU_ZONE:-us-west4-a}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ACCELERATOR="${TPU_ACCELERATOR:-v5litepod-8}"
TPU_RUNTIME="${TPU_RUNTIME:-v2-alpha-tpuv5-lite}"
# Virtual environment on every worker (JAX needs Python >= 3.11; the TPU VM images ship
# an older system Python, so setup.sh builds this venv with uv). Expanded on the worker.
TPU_VENV="${TPU_VENV:-\$HOME/jaxopt_venv}"
DRY_RUN=0
NSHIFT=0

# shellcheck disable=SC2034  # used by the scripts that source this file
COMMON_USAGE="common flags:
  --name NAME               TPU VM (node) name            [\$TPU_NAME, default jaxopt-dnn]
  --zone ZONE               GCP zone                      [\$TPU_ZONE, default us-west4-a]
  --project PROJECT         GCP project (default: gcloud's configured project) [\$TPU_PROJECT]
  --accelerator-type TYPE   e.g. v5litepod-8, v5litepod-32, v4-8 [\$TPU_ACCELERATOR]
  --version RUNTIME         TPU software version, e.g. v2-alpha-tpuv5-lite [\$TPU_RUNTIME]
  --dry-run                 print the exact commands instead of running them
  -h, --help                this help"

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints one argument quoted for bash only when it needs quoting.
quote_arg() {
  local a="$1"
  if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$a"
  elif [[ "$a" == *[[:cntrl:]]* ]]; then
    printf '%q' "$a"  # $'...' keeps a newline or other control character on one line
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

# Quotes one value for the worker's shell (printf %q), so that nothing in it is expanded,
# substituted or split there. The one deliberate exception: a leading literal '$HOME' (or
# '~') followed by '/' or the end becomes "$HOME", which the worker's shell expands to its
# own home directory (the documented `--out '$HOME/run1'` form); the rest is quoted.
# shellcheck disable=SC2016,SC2088  # a literal $HOME / ~, matched and emitted on purpose
remote_quote() {
  local a="$1" rest
  case "$a" in
    '$HOME' | '~') printf '"$HOME"'; return ;;
    '$HOME/'* | '~/'*) rest="${a#*/}" ;;
    *) printf '%q' "$a"; return ;;
  esac
  if [[ "$rest" =~ ^[A-Za-z0-9_./:=@,+%^-]*$ ]]; then
    printf '"$HOME/%s"' "$rest"   # nothing in rest is special inside double quotes
  else
    printf '"$HOME"/%q' "$rest"
  fi
}

# Runs a command, or with --dry-run prints it (one line, copy-pastable).
run() {
  if ((DRY_RUN)); then
    local out="" a
    for a in "$@"; do
      out+="$(quote_arg "$a") "
    done
    printf '%s\n' "${out% }"
  else
    "$@"
  fi
}

# Joins shell statements into one line for a remote --command ("a; b; c").
join_steps() {
  local out="" s
  for s in "$@"; do
    out+="$s; "
  done
  printf '%s' "${out%; }"
}

# Parses the common flags; anything else goes to the caller's `handle_flag "$@"`, which
# sets NSHIFT to the number of arguments it consumed (0: not its flag).
parse_flags() {
  while (($#)); do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) TPU_ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) TPU_PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --accelerator-type) TPU_ACCELERATOR="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --version) TPU_RUNTIME="${2:?--version needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *)
        NSHIFT=0
        handle_flag "$@"
        ((NSHIFT > 0)) || die "unknown flag: $1 (see --help)"
        shift "$NSHIFT"
        ;;
    esac
  done
}

# The location flags every gcloud tpu command takes (and a check of the node name, which
# also appears in scp's NAME:PATH arguments).
location_flags() {
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name must be lowercase letters, digits and hyphens, starting with a letter, got $(quote_arg "$TPU_NAME")"
  LOCATION=(--zone="$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    LOCATION+=(--project="$TPU_PROJECT")
  fi
}

# Number of TPU VM hosts (workers) of an accelerator type, from the documented layouts:
# v5e/v6e (v5litepod-N, v6e-N: N chips): one host up to 8 chips, then 4 chips per host;
# v2/v3/v4/v5p (-N counts TensorCores): 8 TensorCores per host.
hosts_for() {
  local t="$1" n
  n="${t##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$t'"
  case "$t" in
    v5litepod-* | v6e-*) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    v2-* | v3-* | v4-* | v5p-*) if ((n <= 8)); then echo 1; else echo $((n / 8)); fi ;;
    *) die "unknown accelerator type '$t' (expected v2-N, v3-N, v4-N, v5p-N, v5litepod-N or v6e-N)" ;;
  esac
}

# Where setup.sh installs the package from: the one value the notebooks' install cell reads
# too. Anything `pip install` takes: a wheel file (copied to the workers), a checkout
# directory (built into a wheel here, then copied), or a requirement the workers resolve
# themselves (git+https://github.com/<owner>/jaxopt_dnn@<ref>, a package name). Default:
# the checkout these scripts are in. --source, --git URL [--ref REF] and --wheel override it.
JAXOPT_DNN_SOURCE="${JAXOPT_DNN_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
