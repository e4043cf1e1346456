# shellcheck shell=bash
# Shared by the TPU VM scripts in this folder (sourced, not run): settings, checks, run-or-print.
#
# Settings come from the environment; each script names the ones it needs in its header.
#   TPU_NAME          the TPU VM (pod slice) name
#   ZONE              its zone, e.g. us-central2-b
#   PROJECT           the Google Cloud project (optional: gcloud's default project otherwise)
#   REMOTE_DIR        where the code lives on each worker, relative to the home folder
#                     (default: jaxsel)
#   DRY_RUN=1         print every command, one per line and shell-quoted, instead of running it
set -euo pipefail

# shellcheck disable=SC2034  # REPO is for the scripts that source this file.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT=$(basename "$0")
REMOTE_DIR=${REMOTE_DIR:-jaxsel}

# require VAR...: stop before doing anything if any of these variables is unset or empty.
require() {
  local name missing=()
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    echo "$SCRIPT: set ${missing[*]} in the environment (see the header of tpu_scripts/$SCRIPT)" >&2
    exit 2
  fi
}

# run CMD [ARGS...]: run it, or under DRY_RUN=1 print it on one line, each word shell-quoted.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
  else
    "$@"
  fi
}

# tpu_vm SUBCOMMAND [ARGS...]: gcloud compute tpus tpu-vm SUBCOMMAND ARGS in $ZONE (and $PROJECT).
tpu_vm() {
  local subcommand=$1
  shift
  run gcloud compute tpus tpu-vm "$subcommand" "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}
}
