# shellcheck shell=bash
# Sourced by launch/torchrun_local.sh and launch/deepspeed_local.sh: config path, rank count, threads.
# Expects ROOT (the repository); sets NPROC, MEGALM_PYTHON and the MEGALM_CMD_ARGS array.

megalm_local_setup() {
  : "${MEGALM_CONFIG:=configs/gpt_tiny.yaml}"
  : "${MEGALM_PYTHON:=python3}"
  local config=$MEGALM_CONFIG
  case "$config" in /*) ;; *) [ -f "$config" ] || config=$ROOT/$config ;; esac
  if [ ! -f "$config" ]; then
    echo "megalm: config $MEGALM_CONFIG not found (relative to $PWD or $ROOT)" >&2
    exit 2
  fi
  MEGALM_CMD_ARGS=(--config "$config")
  if [ -n "${MEGALM_DS_CONFIG:-}" ]; then
    local ds=$MEGALM_DS_CONFIG
    case "$ds" in /*) ;; *) [ -f "$ds" ] || ds=$ROOT/$ds ;; esac
    MEGALM_CMD_ARGS+=(--ds-config "$ds")
  fi
  if [ -z "${NPROC:-}" ]; then
    NPROC=0
    if command -v nvidia-smi >/dev/null 2>&1; then
      NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [ "$NPROC" -gt 0 ] || NPROC=2
  fi
  # N ranks share this machine's cores; without this each would start one thread per core.
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    local cores
    cores=$(nproc)
    OMP_NUM_THREADS=$((cores / NPROC > 0 ? cores / NPROC : 1))
    export OMP_NUM_THREADS
  fi
  export PYTHONUNBUFFERED=1
}
