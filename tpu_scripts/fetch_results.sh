#!/usr/bin/env bash
# Copies a run's checkpoints and every worker's log back to this machine.
#
#   tpu_scripts/fetch_results.sh --name my-tpu --from '$HOME/jaxopt_run' --to results/run1
#   tpu_scripts/fetch_results.sh --name my-pod --accelerator-type v5litepod-32 \
#       --from gs://my-bucket/run1 --to results/run1
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FROM=""
TO=""

usage() {
  cat <<USAGE
usage: $0 [flags]
Copies the checkpoint directory (--from: gs:// with 'gcloud storage cp', or a path on
worker 0 with 'gcloud compute tpus tpu-vm scp') and ~/train_tpu.log of every worker
(into TO/logs/worker-I.log).

$COMMON_USAGE
fetch flags:
  --from PATH   the --out given to launch.sh (default \$HOME/jaxopt_run on worker 0)
  --to DIR      local destination (default results/<name>)
USAGE
}

handle_flag() {
  case "$1" in
    --from) FROM="${2:?--from needs a value}"; NSHIFT=2 ;;
    --to) TO="${2:?--to needs a value}"; NSHIFT=2 ;;
    *) NSHIFT=0 ;;
  esac
}

parse_flags "$@"
location_flags
hosts="$(hosts_for "$TPU_ACCELERATOR")"
FROM="${FROM:-\$HOME/jaxopt_run}"
TO="${TO:-results/$TPU_NAME}"

if [[ "$FROM" != gs://* ]]; then
  # scp does not expand $HOME / ~ on the worker: paths relative to the home directory.
  rel="${FROM#\$HOME/}"
  rel="${rel#\~/}"
  # scp may hand the remote path to the worker's shell: only plain paths are accepted.
  [[ "$rel" =~ ^[A-Za-z0-9_./+-]+$ && "$rel" != -* ]] ||
    die "--from must be gs://... or a plain path on the worker (letters, digits, _ . / + -), got $(quote_arg "$FROM")"
fi

run mkdir -p "$TO/logs"
if [[ "$FROM" == gs://* ]]; then
  run gcloud storage cp --recursive "$FROM" "$TO/"
else
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$rel" "$TO/" "${LOCATION[@]}" \
    --worker=0
fi
for ((w = 0; w < hosts; w++)); do
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:train_tpu.log" "$TO/logs/worker-$w.log" \
    "${LOCATION[@]}" --worker="$w"
done
