#!/bin/bash
# Pretrain the XLNet-style permutation LM (configs/plm_base.yaml) on N nodes x 8 GPUs under Slurm, one rank per GPU.
#
#   cd /path/to/megalm        # on a filesystem every node sees
#   SBATCH_ACCOUNT=myacct SBATCH_PARTITION=gpu sbatch --nodes=8 launch/pretrain_plm_base.sh \
#       --set run.dir=/scratch/$USER/plm_base --set data.prefix=/data/pile_text_document
#
# Nothing here needs editing: sbatch options come from the command line or SBATCH_* variables
# (SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_TIMELIMIT, ...), the rest from MEGALM_* variables
# (launch/slurm_common.sh lists them); arguments go to megalm/pretrain.py. On USR1 (120 s before the
# time limit) every rank checkpoints and exits 75, and the job requeues itself and resumes.
#SBATCH --job-name=megalm-plm-base
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${MEGALM_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${MEGALM_CONFIG:=configs/plm_base.yaml}"
if [ ! -f "$MEGALM_ROOT/launch/slurm_common.sh" ]; then
  echo "megalm: $MEGALM_ROOT is not a megalm checkout: submit from the repository root or set MEGALM_ROOT" >&2
  exit 2
fi
# shellcheck source=slurm_common.sh source-path=SCRIPTDIR
. "$MEGALM_ROOT/launch/slurm_common.sh"
megalm_slurm_main "$@"
