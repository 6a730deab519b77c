"""One harness for multi-rank tests: spawn N gloo ranks on this CPU, collect results, clean up.

Each rank gets OMP_NUM_THREADS=1 (N ranks share 2 cores), a process group
that is torn down with barrier + destroy (DeepSpeed aborts at exit otherwise),
and any /dev/shm files carrying the run's port are removed afterwards.
"""

from __future__ import annotations

import glob
import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_shm(port: int) -> None:
    """Remove shared-memory files a run on ``port`` left (DeepSpeed's CPU comm buffers)."""
    for path in glob.glob(f"/dev/shm/*_{port}_*") + glob.glob(f"/dev/shm/*{port}*"):
        try:
            os.remove(path)
        except OSError:
            pass


def _entry(fn: Callable, rank: int, world_size: int, port: int, queue: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle, by value: torch's queue would share tensors through a file descriptor this rank
        # serves until it exits, and the parent sometimes read after the exit (FileNotFoundError).
        queue.put((rank, True, pickle.dumps(result)))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``fn`` must be a module-level function (ranks are spawned, not forked).
    A failure on any rank raises with that rank's traceback.
    """
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        failures = []
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
                break
        if failures:
            raise AssertionError("\n".join(failures))
        for p in procs:
            p.join(timeout=60)
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        clean_shm(port)
