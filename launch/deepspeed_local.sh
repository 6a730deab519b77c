#!/bin/bash
# Train on this one machine with the DeepSpeed launcher: one rank per GPU (NPROC ranks on gloo without GPU).
#
#   launch/deepspeed_local.sh [--set key=value ...]
#   NPROC=8 MEGALM_CONFIG=configs/gpt_1b.yaml MEGALM_DS_CONFIG=configs/ds/zero1_bf16.json launch/deepspeed_local.sh
#
# Knobs: MEGALM_CONFIG [configs/gpt_tiny.yaml], MEGALM_DS_CONFIG [none], NPROC [GPU count, else 2],
# MEGALM_PYTHON [python3], MASTER_PORT [29500 + a few from the pid]. Arguments go to megalm/pretrain.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=local_common.sh source-path=SCRIPTDIR
. "$ROOT/launch/local_common.sh"
megalm_local_setup

exec "$MEGALM_PYTHON" -m deepspeed.launcher.runner --num_gpus="$NPROC" \
  --master_port="${MASTER_PORT:-$((29500 + $$ % 1000))}" \
  "$ROOT/megalm/pretrain.py" "${MEGALM_CMD_ARGS[@]}" "$@"
