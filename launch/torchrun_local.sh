#!/bin/bash
# Train on this one machine with torchrun: one rank per GPU (NPROC ranks on gloo when there is no GPU).
#
#   launch/torchrun_local.sh [--set key=value ...]
#   NPROC=4 MEGALM_CONFIG=configs/gpt_125m.yaml launch/torchrun_local.sh --set train.iters=100
#
# Knobs: MEGALM_CONFIG [configs/gpt_tiny.yaml], MEGALM_DS_CONFIG [none], NPROC [GPU count, else 2],
# MEGALM_PYTHON [python3], MASTER_PORT [a free one, chosen by torchrun]. Arguments go to megalm/pretrain.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=local_common.sh source-path=SCRIPTDIR
. "$ROOT/launch/local_common.sh"
megalm_local_setup

port_args=(--rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:${MASTER_PORT:-0}")
exec "$MEGALM_PYTHON" -m torch.distributed.run --nnodes=1 --nproc-per-node="$NPROC" "${port_args[@]}" \
  "$ROOT/megalm/pretrain.py" "${MEGALM_CMD_ARGS[@]}" "$@"
