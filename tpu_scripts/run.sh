#!/usr/bin/env bash
# Run one experiment on every worker of a TPU VM pod slice at once (after setup.sh).
#
#   TPU_NAME=my-pod ZONE=us-central2-b tpu_scripts/run.sh experiments.pretrain \
#       --config=experiments/configs/pretrain.py:small --workdir=gs://my-bucket/runs/small ...
#
# Needs TPU_NAME and ZONE; optional: PROJECT, REMOTE_DIR (as for setup.sh). Every worker runs
#   export JAXSEL_DISTRIBUTED=1 && cd REMOTE_DIR && .venv/bin/python -m MODULE ARGS...
# with each argument shell-quoted, so spaces and quotes arrive as typed.
# The --workdir must be a folder that every worker sees (all hosts write the orbax
# checkpoints): a gs:// path, or a Filestore / NFS mount at the same path on every worker. A
# worker's local disk does not work. The run ends when the SSH connection
# does, so start long runs from tmux or screen; the same command again resumes from the last
# checkpoint.
# LOCAL=1 runs the command here instead, in this checkout, as one process and without setting
# JAXSEL_DISTRIBUTED (there is no pod here to find a coordinator in): a check of the command
# line that needs no TPU. DRY_RUN=1 prints the command instead of running it.
# Settings: tpu_scripts/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if (($# == 0)); then
  echo "usage: $SCRIPT MODULE [ARGS...], e.g. $SCRIPT experiments.pretrain --workdir=DIR" >&2
  exit 2
fi

# worker_command DIR MODULE [ARGS...]: the shell line that runs MODULE with the venv in DIR.
worker_command() {
  local dir=$1
  shift
  printf 'cd %q && .venv/bin/python -m' "$dir"
  printf ' %q' "$@"
}

if [[ "${LOCAL:-0}" == 1 ]]; then
  run bash -c "$(worker_command "$REPO" "$@")"
else
  require TPU_NAME ZONE
  tpu_vm ssh "$TPU_NAME" --worker=all \
    --command="export JAXSEL_DISTRIBUTED=1 && $(worker_command "$REMOTE_DIR" "$@")"
fi
