#!/usr/bin/env bash
# Delete a TPU VM pod slice (without asking). What was on its disks is gone; a shared workdir
# (gs:// bucket, Filestore / NFS) is not touched.
#
#   TPU_NAME=my-pod ZONE=us-central2-b tpu_scripts/teardown.sh [EXTRA_GCLOUD_FLAGS...]
#
# Needs TPU_NAME and ZONE; optional: PROJECT. Extra flags (e.g. --async) go to
# `gcloud compute tpus tpu-vm delete`. DRY_RUN=1 prints the command instead of running it.
# Settings: tpu_scripts/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE

tpu_vm delete "$TPU_NAME" --quiet "$@"
