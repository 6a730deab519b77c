#!/bin/bash
# A stand-in for `apptainer exec IMAGE CMD...` in the Slurm tests: IMAGE is a directory holding the
# code at the in-image path. Like a real container, nothing of the host checkout may reach the command:
# an argument naming FAKE_CONTAINER_HOST_ROOT fails the task (exit 97). Each use is logged.
set -euo pipefail
image=$1
shift
[ -d "$image" ] || { echo "fake_container: no image $image" >&2; exit 96; }
if [ -n "${FAKE_CONTAINER_HOST_ROOT:-}" ]; then
  for arg in "$@"; do
    case "$arg" in
      *"$FAKE_CONTAINER_HOST_ROOT"*)
        echo "fake_container: host path leaked into the container command: $arg" >&2
        exit 97
        ;;
    esac
  done
fi
echo "${SLURM_STEP_ID:-?} ${SLURM_PROCID:-?} $*" >>"${FAKE_CONTAINER_LOG:-/dev/null}"
cd "$image"
exec "$@"
