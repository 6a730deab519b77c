"""The operational environment variables megalm reads, in one place, each behind a named accessor.

Behaviour that changes kernels or numerics is a config key, never a variable; what is read here is
where and how a process runs (its rank, its node's task count, a cache path, credentials), which a
launcher or a cluster decides. Each accessor reads the environment when called, not at import.

| variable | accessor | why |
|---|---|---|
| ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` | ``rank``, ``world_size``, ``local_rank`` | set by torchrun / deepspeed, or by ``distributed.discover`` from Slurm or MPI |
| ``LOCAL_WORLD_SIZE``, ``SLURM_NTASKS_PER_NODE`` | ``local_world_size`` | ranks sharing a node's cores (CPU threads per rank) |
| ``OMP_NUM_THREADS`` | ``omp_threads_set`` | a user's thread count wins over megalm's per-rank share |
| ``MASTER_PORT`` | ``master_port`` | names this run's DeepSpeed ``/dev/shm`` buffers, to remove them |
| ``SLURM_JOB_ID`` | ``slurm_job_id`` | recorded in the run lock; seeds the default master port under srun |
| ``SLURM_NTASKS`` | ``slurm_ntasks`` | ``megalm check``'s default world size inside an allocation |
| ``SLURM_STEP_NODELIST``, ``SLURM_JOB_NODELIST`` | ``slurm_nodelist`` | the master address under srun (first host) |
| ``MEGALM_CACHE`` | ``cache_dir`` | where the compiled data helpers are kept (default ``~/.cache/megalm``) |
| ``MEGALM_NO_NATIVE`` | ``native_disabled`` | ``1``: use the numpy data helpers, compile nothing |
| ``CC`` | ``c_compiler`` | the C compiler for those helpers (default ``cc``, then ``gcc``) |
| ``MEGALM_CPU_SHM_COMM`` | ``cpu_shm_comm`` | ``1``: keep DeepSpeed's CPU shared-memory allreduce (slow to build, leaks /dev/shm) |
| ``WANDB_API_KEY``, ``WANDB_BASE_URL``, ``WANDB_MODE`` | ``wandb_*`` | W&B's own variables: whether ``run.wandb.mode=auto`` can go online |

``distributed.discover`` also reads the launchers' own variables (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, ``OMPI_COMM_WORLD_*``, ``PMIX_RANK``, ``PMI_SIZE``) from
the mapping it is given, because its job is to translate them into the ``RANK`` & co. above.
Variables megalm only *sets* for a child or a library (``DS_ACCELERATOR``, ``RAYON_NUM_THREADS``, a
launcher's environment) are not reads and live where they are set.
"""

from __future__ import annotations

import os
from typing import Optional


def _get(name: str, default: Optional[str] = None) -> Optional[str]:
    return os.environ.get(name, default)


def rank() -> int:
    """This process's global rank (0 outside a launcher)."""
    return int(_get("RANK") or 0)


def world_size() -> int:
    """Ranks in the job (1 outside a launcher)."""
    return int(_get("WORLD_SIZE") or 1)


def local_rank() -> int:
    """This process's rank on its node: its GPU index."""
    return int(_get("LOCAL_RANK") or 0)


def local_world_size() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks per node ("4(x2)" reads 4),
    else the whole world."""
    slurm = (_get("SLURM_NTASKS_PER_NODE") or "").split("(")[0]
    return int(_get("LOCAL_WORLD_SIZE") or slurm or world_size())


def omp_threads_set() -> bool:
    """Whether the user (or launcher) chose OMP_NUM_THREADS."""
    return "OMP_NUM_THREADS" in os.environ


def master_port() -> Optional[str]:
    return _get("MASTER_PORT") or None


def slurm_job_id() -> Optional[str]:
    return _get("SLURM_JOB_ID")


def slurm_ntasks() -> Optional[int]:
    """The allocation's task count, or None outside Slurm (or when it is not a plain number)."""
    ntasks = _get("SLURM_NTASKS") or ""
    return int(ntasks) if ntasks.isdigit() else None


def slurm_nodelist() -> str:
    """The step's node list (else the job's), in Slurm's compressed form; "" outside Slurm."""
    return _get("SLURM_STEP_NODELIST") or _get("SLURM_JOB_NODELIST") or ""


def cache_dir() -> str:
    return _get("MEGALM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megalm")


def native_disabled() -> bool:
    return _get("MEGALM_NO_NATIVE") == "1"


def c_compiler() -> str:
    return _get("CC") or "cc"


def cpu_shm_comm() -> bool:
    return _get("MEGALM_CPU_SHM_COMM") == "1"


def wandb_api_key_set() -> bool:
    return bool(_get("WANDB_API_KEY"))


def wandb_base_url() -> str:
    return _get("WANDB_BASE_URL") or "https://api.wandb.ai"


def wandb_mode() -> Optional[str]:
    """W&B's WANDB_MODE, which wins over run.wandb.mode (as it does in wandb itself)."""
    return _get("WANDB_MODE")
