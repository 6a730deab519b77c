# shellcheck shell=bash
# Sourced by launch/pretrain_*.sh inside a Slurm batch job: environment, rendezvous, one rank per
# task with srun, and the preemption flow (USR1 -> checkpoint -> exit 75 -> scontrol requeue -> resume).
#
# Knobs (environment variables; every one has a default, docs/cluster.md explains them):
#   MEGALM_ROOT          repository checkout on a shared filesystem   [$SLURM_SUBMIT_DIR]
#   MEGALM_IMAGE_ROOT    the same code as the ranks see it, e.g. /opt/megalm inside a container image:
#                        MEGALM_ENTRY and relative MEGALM_CONFIG / MEGALM_DS_CONFIG resolve against it [$MEGALM_ROOT]
#   MEGALM_CHECK         1: run `pretrain.py --check` (megalm check) in one task before srun starts the ranks;
#                        0: skip it. Only for the default MEGALM_ENTRY  [1]
#   MEGALM_CONFIG        model/run config (relative to MEGALM_ROOT)   [set by the calling script]
#   MEGALM_DS_CONFIG     optional DeepSpeed JSON passed as --ds-config [none: derived from the config]
#   MEGALM_PYTHON        interpreter on the compute nodes             [python3]
#   MEGALM_ENTRY         training entry point (relative to MEGALM_ROOT) [megalm/pretrain.py]
#   MEGALM_SETUP         a file sourced first (module load, venv activate, site NCCL settings) [none]
#   MEGALM_CONTAINER     command prefix per task, e.g. "apptainer exec --nv megalm.sif" [none]
#   MEGALM_SRUN_ARGS     extra srun arguments, e.g. "--container-image=megalm.sqsh" (pyxis/enroot) [none]
#   MEGALM_MASTER_PORT   rendezvous port                    [from the job id; a free one if that is taken]
#   MEGALM_MAX_REQUEUES  give up requeueing after this many restarts  [50]
#   MEGALM_SRUN_WAIT     seconds srun lets other ranks run after one has exited (then kills them) [300]
#   MEGALM_ARGS          extra arguments for the entry point, before the script's own arguments [none]
# Script arguments go to the entry point as well, e.g. `sbatch launch/pretrain_gpt_1b.sh --set train.iters=10`.

MEGALM_EXIT_PREEMPTED=75 # EX_TEMPFAIL: the entry point checkpointed on USR1/TERM and asks to be requeued

megalm_log() {
  printf '[megalm-launch %s job %s] %s\n' "$(date +%H:%M:%S)" "${SLURM_JOB_ID:-?}" "$*"
}

megalm_die() {
  megalm_log "error: $*" >&2
  exit 2
}

# Resolve a path relative to MEGALM_ROOT (the host checkout this script runs from) unless it is absolute.
megalm_path() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$MEGALM_ROOT/$1" ;;
  esac
}

# The same, for what the ranks open: relative to MEGALM_IMAGE_ROOT (the code inside a container image).
megalm_image_path() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$MEGALM_IMAGE_ROOT/$1" ;;
  esac
}

# The batch script runs on the allocation's first node, MASTER_ADDR: keep the job-id port if it is free
# there, else take one the kernel says is free (another job or a lingering socket may hold it).
megalm_pick_port() {
  local want=$1 py
  py=$(command -v python3 || command -v "${MEGALM_PYTHON:-python3}" || true)
  if [ -z "$py" ]; then
    echo "$want"
    return
  fi
  "$py" - "$want" <<'PY' || echo "$want"
import socket, sys
want = int(sys.argv[1])
for port in (want, 0):
    s = socket.socket()
    try:
        s.bind(("", port))
        print(s.getsockname()[1])
        break
    except OSError:
        continue
    finally:
        s.close()
PY
}

megalm_environment() {
  [ -n "${SLURM_JOB_ID:-}" ] || megalm_die "not inside a Slurm job: submit with sbatch"
  if [ -n "${MEGALM_SETUP:-}" ]; then
    [ -f "$MEGALM_SETUP" ] || megalm_die "MEGALM_SETUP=$MEGALM_SETUP does not exist"
    # shellcheck disable=SC1090  # a site file, chosen at submit time
    . "$MEGALM_SETUP"
  fi
  : "${MEGALM_PYTHON:=python3}"
  : "${MEGALM_ENTRY:=megalm/pretrain.py}"
  : "${MEGALM_MAX_REQUEUES:=50}"
  : "${MEGALM_SRUN_WAIT:=300}"
  : "${MEGALM_IMAGE_ROOT:=$MEGALM_ROOT}"
  : "${MEGALM_CHECK:=1}"
  MEGALM_CONFIG_PATH=$(megalm_image_path "$MEGALM_CONFIG")
  # Inside an image the config is checked where it lives, by `pretrain.py --check` in the container.
  if [ "$MEGALM_IMAGE_ROOT" = "$MEGALM_ROOT" ] && [ ! -f "$MEGALM_CONFIG_PATH" ]; then
    megalm_die "config $MEGALM_CONFIG_PATH not found (set MEGALM_ROOT or MEGALM_CONFIG)"
  fi

  # Rendezvous: the first node of the allocation, a port from the job id (checked free). The restart
  # count moves the port on a requeue so a rerun never meets the previous run's socket in TIME_WAIT.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [ -n "$MASTER_ADDR" ] || megalm_die "could not read the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  MASTER_PORT=${MEGALM_MASTER_PORT:-$(megalm_pick_port "$((20000 + (SLURM_JOB_ID % 4000) * 10 + ${SLURM_RESTART_COUNT:-0} % 10))")}
  export MASTER_ADDR MASTER_PORT

  # One math thread per CPU Slurm gave the task: N ranks on a node must not fight over all cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # NCCL: surface errors instead of hanging, keep logs short; site fabric settings (NCCL_SOCKET_IFNAME,
  # NCCL_IB_HCA, ...) pass through from the environment or MEGALM_SETUP untouched.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Tensor-parallel comm/compute overlap relies on kernels being issued in order.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
  # The CPU comm op DeepSpeed JIT-builds is cached per job rather than in $HOME.
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/megalm-torch-extensions}
}

MEGALM_SRUN_PID=""
MEGALM_PREEMPTED=0

# USR1 (Slurm's warning before the time limit, or `scancel --signal=USR1 --batch`) and TERM reach
# only this batch shell; pass USR1 on to every rank through srun, which forwards it to its tasks.
megalm_on_signal() {
  MEGALM_PREEMPTED=1
  megalm_log "got $1: asking all ranks to checkpoint and exit"
  if [ -n "$MEGALM_SRUN_PID" ]; then
    kill -USR1 "$MEGALM_SRUN_PID" 2>/dev/null || true
  fi
}

megalm_srun() {
  local -a srun_args=() container=() extra=()
  read -r -a srun_args <<<"${MEGALM_SRUN_ARGS:-}"
  read -r -a container <<<"${MEGALM_CONTAINER:-}"
  read -r -a extra <<<"${MEGALM_ARGS:-}"
  local -a cmd=("$MEGALM_PYTHON" "$(megalm_image_path "$MEGALM_ENTRY")" --config "$MEGALM_CONFIG_PATH")
  if [ -n "${MEGALM_DS_CONFIG:-}" ]; then
    cmd+=(--ds-config "$(megalm_image_path "$MEGALM_DS_CONFIG")")
  fi
  cmd+=("${extra[@]}" "$@")
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then # srun >= 22.05 no longer inherits it from sbatch
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  fi

  # Preflight: the same arguments through `megalm check`, in one task with the ranks' container and
  # environment, so a wrong path or key fails here in seconds instead of on every rank.
  if [ "$MEGALM_CHECK" = "1" ] && [ "$MEGALM_ENTRY" = "megalm/pretrain.py" ]; then
    megalm_log "checking: ${container[*]} ${cmd[*]} --check --world-size $SLURM_NTASKS"
    if ! srun --ntasks=1 --nodes=1 "${srun_args[@]}" "${container[@]}" "${cmd[@]}" --check \
      --world-size "$SLURM_NTASKS"; then
      megalm_log "error: megalm check failed (above): not starting the ranks" >&2
      return 2
    fi
  fi

  megalm_log "nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT," \
    "restart ${SLURM_RESTART_COUNT:-0}"
  megalm_log "running: ${container[*]} ${cmd[*]}"
  # Each task maps Slurm's ids to the torch.distributed names too, so any env:// program works.
  # --kill-on-bad-exit=0 + --wait: a rank that exits 75 after its checkpoint must not kill ranks still
  # writing theirs; a crashed rank still brings the step down after MEGALM_SRUN_WAIT seconds.
  # shellcheck disable=SC2016  # expanded by each task's bash, not here
  srun --kill-on-bad-exit=0 --wait="$MEGALM_SRUN_WAIT" "${srun_args[@]}" \
    bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' \
    megalm-task "${container[@]}" "${cmd[@]}" &
  MEGALM_SRUN_PID=$!
  local pid=$MEGALM_SRUN_PID rc=0
  # `wait` returns early (>128) whenever a trapped signal arrives; keep waiting until srun is gone,
  # then ask once more: bash keeps a finished child's status, so this is srun's own exit code.
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true
  done
  wait "$pid" || rc=$?
  MEGALM_SRUN_PID=""
  return "$rc"
}

# Run the job; on exit code 75 requeue it (the rerun resumes from run.dir/checkpoints).
megalm_slurm_main() {
  # Trap first: an untrapped USR1 would kill this shell, and the job with it, without a requeue.
  trap 'megalm_on_signal USR1' USR1
  trap 'megalm_on_signal TERM' TERM
  megalm_environment
  local rc=0
  if [ "$MEGALM_PREEMPTED" -eq 1 ]; then
    megalm_log "signalled before training started: nothing to save"
    rc=$MEGALM_EXIT_PREEMPTED
  else
    megalm_srun "$@" || rc=$?
  fi
  if [ "$rc" -eq "$MEGALM_EXIT_PREEMPTED" ]; then
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "$MEGALM_MAX_REQUEUES" ]; then
      megalm_log "preempted, but already restarted $restarts times (MEGALM_MAX_REQUEUES): not requeueing"
      exit "$rc"
    fi
    megalm_log "ranks checkpointed and exited $rc: requeueing (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID" || megalm_die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
  fi
  if [ "$MEGALM_PREEMPTED" -eq 1 ] && [ "$rc" -eq 0 ]; then
    megalm_log "signalled, but training had already finished"
  fi
  megalm_log "training exited with $rc"
  exit "$rc"
}
