#!/usr/bin/env bash
# Create a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 TPU_VERSION=tpu-ubuntu2204-base \
#       tpu_scripts/create.sh [EXTRA_GCLOUD_FLAGS...]
#
# Needs TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v4-32, v5p-64) and TPU_VERSION (the TPU software
# version, e.g. tpu-ubuntu2204-base; list them with `gcloud compute tpus tpu-vm versions list`).
# Optional: PROJECT; SPOT=1 for a Spot VM (cheaper, can be preempted at any time). Extra flags
# (e.g. --reserved, --network=NET) go to `gcloud compute tpus tpu-vm create` as they are.
# DRY_RUN=1 prints the command instead of running it. Settings: tpu_scripts/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE ACCELERATOR_TYPE TPU_VERSION

flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION")
if [[ "${SPOT:-0}" == 1 ]]; then
  flags+=(--spot)
fi
tpu_vm create "$TPU_NAME" "${flags[@]}" "$@"
