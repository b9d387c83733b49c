#!/usr/bin/env bash
# Deletes a TPU VM (or its queued resource) so that it stops costing money.
#
#   tpu_scripts/delete.sh --name my-tpu --zone us-west4-a
#   tpu_scripts/delete.sh --name my-pod --queued --yes
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
QR_ID=""
YES=0

usage() {
  cat <<USAGE
usage: $0 [flags]
Deletes the TPU VM \$TPU_NAME ('gcloud compute tpus tpu-vm delete'), or with --queued
the queued resource and its node ('gcloud compute tpus queued-resources delete --force').

$COMMON_USAGE
delete flags:
  --queued          the VM was created with create.sh --queued
  --queued-id ID    queued-resource id (default: <name>-qr)
  --yes             do not ask for confirmation (passes --quiet to gcloud)
USAGE
}

handle_flag() {
  case "$1" in
    --queued) QUEUED=1; NSHIFT=1 ;;
    --queued-id) QR_ID="${2:?--queued-id needs a value}"; NSHIFT=2 ;;
    --yes) YES=1; NSHIFT=1 ;;
    *) NSHIFT=0 ;;
  esac
}

parse_flags "$@"
location_flags
QR_ID="${QR_ID:-${TPU_NAME}-qr}"
quiet=()
if ((YES)); then quiet=(--quiet); fi

if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$QR_ID" "${LOCATION[@]}" --force \
    ${quiet[@]+"${quiet[@]}"}
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" ${quiet[@]+"${quiet[@]}"}
fi
