"""One job per run directory: a second job that points at a live run's directory exits at once.

``<run.dir>/.megalm.lock`` names its holder (host, pid, Slurm job). It is taken over
when the holder is known dead: same host and the pid is gone (kill -9, OOM), or the
same Slurm job id (a requeued job is the same run). Created with ``os.link`` so two
starters cannot both win, also on NFS.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Optional

from megalm import environment
from megalm.errors import CheckpointError

logger = logging.getLogger(__name__)

LOCK = ".megalm.lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": environment.slurm_job_id(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (a zombie or dead entry counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed rank whose parent died too can linger as a zombie (in containers nobody reaps it)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _stale(holder: dict, me: dict) -> bool:
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True  # this job, requeued: the earlier incarnation is gone
    return holder.get("host") == me["host"] and not process_alive(int(holder.get("pid", -1)))


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return {}  # torn by a crash while it was written: nobody can hold it


class RunLock:
    """Held by rank 0 for the life of the job; ``release`` removes it."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.held = False

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        me = _me()
        tmp = f"{self.path}.{me['host']}.{me['pid']}"
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    holder = _read(self.path)
                    if holder is None:
                        continue  # released meanwhile: try again
                    if holder and not _stale(holder, me):
                        raise CheckpointError(
                            f"{os.path.dirname(self.path)} is in use by another job (host {holder.get('host')}, "
                            f"pid {holder.get('pid')}, Slurm job {holder.get('slurm_job') or '-'}, since "
                            f"{holder.get('started')}). Give this job its own run.dir, or stop that one; if it is "
                            f"surely dead, remove {self.path}")
                    logger.warning(f"taking over the stale lock {self.path} of a job that is gone: {holder}")
                    os.replace(tmp, self.path)
                    if (_read(self.path) or {}).get("pid") == me["pid"]:
                        self.held = True
                        return
            raise CheckpointError(f"could not take {self.path}: other jobs keep racing for it")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def release(self) -> None:
        if self.held and (_read(self.path) or {}).get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False
