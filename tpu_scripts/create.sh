#!/usr/bin/env bash
# Creates a Cloud TPU VM (single host or pod slice), directly or as a queued resource.
#
#   tpu_scripts/create.sh --name my-tpu --zone us-west4-a --accelerator-type v5litepod-8
#   tpu_scripts/create.sh --name my-pod --accelerator-type v5litepod-32 \
#       --version v2-alpha-tpuv5-lite --queued --spot --wait
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
SPOT=0
WAIT=0
QR_ID=""

usage() {
  cat <<USAGE
usage: $0 [flags]
Creates the TPU VM \$TPU_NAME with 'gcloud compute tpus tpu-vm create', or with
--queued through 'gcloud compute tpus queued-resources create' (the way to get large
or spot slices: the request waits in a queue until capacity is free).

$COMMON_USAGE
create flags:
  --queued            request a queued resource instead of creating the VM directly
  --queued-id ID      queued-resource id (default: <name>-qr)
  --spot              spot capacity (cheaper, can be preempted)
  --wait              with --queued: poll until the resource is ACTIVE
USAGE
}

handle_flag() {
  case "$1" in
    --queued) QUEUED=1; NSHIFT=1 ;;
    --queued-id) QR_ID="${2:?--queued-id needs a value}"; NSHIFT=2 ;;
    --spot) SPOT=1; NSHIFT=1 ;;
    --wait) WAIT=1; NSHIFT=1 ;;
    *) NSHIFT=0 ;;
  esac
}

parse_flags "$@"
location_flags
QR_ID="${QR_ID:-${TPU_NAME}-qr}"

if ((QUEUED)); then
  cmd=(gcloud compute tpus queued-resources create "$QR_ID" --node-id="$TPU_NAME"
    "${LOCATION[@]}" --accelerator-type="$TPU_ACCELERATOR"
    --runtime-version="$TPU_RUNTIME")
  if ((SPOT)); then cmd+=(--spot); fi
  run "${cmd[@]}"
  describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${LOCATION[@]}"
    --format='value(state.state)')
  if ((WAIT)); then
    if ((DRY_RUN)); then
      echo "# poll every 30 s until it prints ACTIVE:"
      run "${describe[@]}"
    else
      while true; do
        state="$("${describe[@]}")"
        echo "queued resource $QR_ID: $state"
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource $QR_ID is $state" ;;
        esac
        sleep 30
      done
    fi
  fi
else
  cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}"
    --accelerator-type="$TPU_ACCELERATOR" --version="$TPU_RUNTIME")
  if ((SPOT)); then cmd+=(--spot); fi
  run "${cmd[@]}"
fi
