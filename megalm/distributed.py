"""Rank discovery and process-group set-up for every launcher, in one place.

torchrun / deepspeed set RANK & co.; under ``srun`` we read SLURM_*; under
``mpirun`` we ask MPI (mpi4py). Backend: ``cpu:gloo,cuda:nccl`` on CUDA, gloo on CPU.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import socket
import subprocess
import sys
from typing import Optional

from megalm import environment

logger = logging.getLogger(__name__)

_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = environment.slurm_nodelist()
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, check=True, timeout=30).stdout.split()
        return hosts[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0] or "127.0.0.1"


def _from_mpi(env: dict) -> None:
    from mpi4py import MPI  # only under mpirun

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    addr = comm.bcast(socket.gethostbyname(socket.gethostname()) if rank == 0 else None, root=0)
    port = comm.bcast(env.get("MASTER_PORT") or str(_free_port()) if rank == 0 else None, root=0)
    names = comm.allgather(MPI.Get_processor_name())
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK") or str(sum(n == names[rank] for n in names[:rank]))
    env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=local,
               MASTER_ADDR=env.get("MASTER_ADDR") or addr, MASTER_PORT=port)


def discover(env: Optional[dict] = None) -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in ``env``; return the launcher's name."""
    env = os.environ if env is None else env
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        how = "torchrun/deepspeed"
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # inside an srun step
        how = "slurm"
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    elif "OMPI_COMM_WORLD_SIZE" in env or "PMIX_RANK" in env or "PMI_SIZE" in env:
        how = "mpi"
        _from_mpi(env)
    else:
        how = "single"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return how


def _disable_cpu_shm_comm() -> None:
    """DeepSpeed's CPU shared-memory allreduce JIT-compiles for ~30 s per rank and leaks a 69 MB
    /dev/shm file per rank per run; gloo is enough on CPU. MEGALM_CPU_SHM_COMM=1 keeps it."""
    if environment.cpu_shm_comm():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def clean_shm() -> None:
    """Remove DeepSpeed's CPU comm buffers that carry this run's master address and port."""
    port = environment.master_port()
    if not port:
        return
    for path in glob.glob(f"/dev/shm/deepspeed_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def backend_for_device() -> str:
    """``cpu:gloo,cuda:nccl`` on CUDA (NCCL for tensors on the GPU, gloo for any on the CPU), else gloo."""
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init() -> dict:
    """Discover ranks, start the process group (via DeepSpeed), and register a clean shutdown."""
    import torch

    how = discover()
    import deepspeed

    backend = backend_for_device()
    if torch.cuda.is_available():
        torch.cuda.set_device(environment.local_rank())
    else:
        _disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    atexit.register(shutdown)
    info = dict(launcher=how, backend=backend, rank=environment.rank(),
                world_size=environment.world_size(), local_rank=environment.local_rank())
    logger.debug("distributed: %s", info)
    return info


def shutdown(barrier: bool = True) -> None:
    """barrier + destroy (DeepSpeed aborts at exit ~1 in 5 runs without it), then /dev/shm clean-up.

    After an error on this rank pass ``barrier=False``: the other ranks may never reach it.
    """
    import torch.distributed as dist

    from megalm.parallel import comm

    try:
        if dist.is_available() and dist.is_initialized():
            try:
                if barrier:
                    comm.barrier()
            finally:
                dist.destroy_process_group()
    finally:
        clean_shm()


def device() -> "torch.device":  # noqa: F821 - string annotation keeps torch import lazy
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", environment.local_rank())
    return torch.device("cpu")


def exit_without_teardown(code: int) -> None:
    """Run the atexit handlers (run lock, process group, W&B), flush, then ``os._exit``.

    A finished multi-rank command (training, generation) must exit with its own code: under load, the
    interpreter's teardown of DeepSpeed/gloo objects sometimes aborts ("terminate called without an active
    exception", SIGABRT) after the work has ended, which Slurm and torchrun count as a failed task. Nothing
    of ours is left to do by then.
    """
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: mpirun counts a rank that skips MPI_Finalize as failed
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
