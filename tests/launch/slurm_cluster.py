"""A real two-node Slurm cluster on this one machine, for the launch tests.

Starts munged, slurmctld and two slurmd's (fake nodes ``megalm-n1`` / ``megalm-n2``,
both 127.0.0.1) from Debian's packages, each daemon with its own files under one
directory, and stops every one of them by pid. Needs root and the packages
``slurmctld slurmd slurm-client munge libpmix2`` (``install_packages`` gets them
with apt-get). Recipe and traps: /work/shared/notes/slurm-in-ci.md.

By hand::

    python tests/launch/slurm_cluster.py start --dir /tmp/megalm-slurm   # prints export SLURM_CONF=...
    python tests/launch/slurm_cluster.py stop --dir /tmp/megalm-slurm
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megalm.training.run_lock import process_alive

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "libpmix2", "openmpi-bin", "libopenmpi-dev")
BINARIES = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/bin/sbatch")
NODES = ("megalm-n1", "megalm-n2")
HOSTS_MARK = "# megalm-test-slurm"
# A requeued job may start only once its old credential expired (Slurm holds it back that long; forcing
# it earlier fails with "Job credential revoked"). Default 120 s; short here so the requeue test is quick.
CRED_EXPIRE = 5  # Slurm's minimum
REGISTRY = "/tmp/megalm-slurm-clusters"  # one file per running test cluster: who still needs HOSTS_MARK
GPUS_PER_NODE = 8  # fake: dummy files, so the scripts' --gpus-per-node=8 header is honoured as written


def missing_requirement() -> Optional[str]:
    """Why this machine cannot run the cluster (None when it can, or can after install_packages)."""
    if os.geteuid() != 0:
        return "needs root (starts munged/slurmctld/slurmd)"
    if not all(os.path.exists(b) for b in BINARIES) and shutil.which("apt-get") is None:
        return "Slurm packages not installed and apt-get unavailable"
    return None


def install_packages() -> None:
    """apt-get the Debian packages if any daemon binary is missing (CI's .ci/run has already done it)."""
    if all(os.path.exists(b) for b in BINARIES):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class SlurmCluster:
    """One controller and two compute nodes, all files under ``root``; ``start()`` / ``stop()``."""

    root: str
    ports: dict = field(default_factory=dict)

    # ------------------------------------------------------------ paths
    @property
    def conf(self) -> str:
        return os.path.join(self.root, "slurm.conf")

    @property
    def munge_socket(self) -> str:
        return os.path.join(self.root, "munge", "munge.socket")

    def _munge_pidfile(self) -> str:
        return os.path.join(self.root, "munge", "munged.pid")

    def _ctld_pidfile(self) -> str:
        return os.path.join(self.root, "slurmctld.pid")

    def _slurmd_pidfile(self, node: str) -> str:
        return os.path.join(self.root, node, "slurmd.pid")

    def pidfiles(self) -> list[str]:
        return [self._munge_pidfile(), self._ctld_pidfile(), *(self._slurmd_pidfile(n) for n in NODES)]

    @property
    def env(self) -> dict:
        """The environment for sbatch / squeue / scontrol against this cluster."""
        return dict(os.environ, SLURM_CONF=self.conf)

    # ------------------------------------------------------------ commands
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def job_state(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...); {} once the job is gone."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = {}
        for item in out.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields[k] = v
        return fields

    # ------------------------------------------------------------ lifecycle
    def _write_config(self) -> None:
        munge = pwd.getpwnam("munge")
        os.chmod(self.root, 0o755)  # munged runs as 'munge' and must reach its own directory
        mdir = os.path.join(self.root, "munge")
        os.makedirs(mdir, mode=0o700, exist_ok=True)
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        os.makedirs(os.path.join(self.root, "ctld"), exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        self.ports = {"slurmctld": ctld_port, **dict(zip(NODES, node_ports))}
        host = socket.gethostname().split(".")[0]
        gres_lines = []
        node_lines = []
        for node in NODES:
            ndir = os.path.join(self.root, node)
            os.makedirs(os.path.join(ndir, "spool"), exist_ok=True)
            os.makedirs(os.path.join(ndir, "tmp"), exist_ok=True)
            gpus = []
            for i in range(GPUS_PER_NODE):
                path = os.path.join(ndir, f"gpu{i}")
                open(path, "a").close()
                gpus.append(path)
            gres_lines.append(f"NodeName={node} Name=gpu File={','.join(gpus)}")
            node_lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={self.ports[node]} "
                f"CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2000 "
                f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
            )
        r = self.root
        first_job = random.randint(1000, 900000)  # job ids (and the ports derived from them) differ per cluster
        conf = f"""# written by tests/launch/slurm_cluster.py
ClusterName=megalm
FirstJobId={first_job}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
CredType=cred/munge
StateSaveLocation={r}/ctld
SlurmctldPidFile={r}/slurmctld.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdSpoolDir={r}/%n/spool
SlurmdPidFile={r}/%n/slurmd.pid
SlurmdLogFile={r}/%n/slurmd.log
TmpFS={r}/%n/tmp
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
GresTypes=gpu
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
{chr(10).join(node_lines)}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)
        with open(os.path.join(self.root, "gres.conf"), "w") as f:
            f.write("\n".join(gres_lines) + "\n")
        with open(os.path.join(self.root, "cluster.json"), "w") as f:
            json.dump({"ports": self.ports}, f)

    def _add_hosts(self) -> None:
        """Node names must resolve: jobs use ``scontrol show hostnames`` for MASTER_ADDR."""
        with open("/etc/hosts") as f:
            text = f.read()
        missing = [n for n in NODES if not any(n in line.split() for line in text.splitlines())]
        if missing:
            with open("/etc/hosts", "a") as f:
                if not text.endswith("\n"):
                    f.write("\n")
                f.write(f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK}\n")

    def _others_alive(self) -> bool:
        """Whether another test cluster (say, under pytest-xdist) still needs the /etc/hosts names."""
        for entry in os.listdir(REGISTRY) if os.path.isdir(REGISTRY) else []:
            if entry.startswith("."):
                continue
            path = os.path.join(REGISTRY, entry)
            try:
                with open(path) as f:
                    other_root = f.read().strip()
            except OSError:
                continue
            if other_root == self.root:
                continue
            pid = _read_pid(os.path.join(other_root, "slurmctld.pid"))
            if pid and process_alive(pid):
                return True
            try:
                os.remove(path)  # a cluster that died without stopping
            except OSError:
                pass
        return False

    def _register(self, on: bool) -> None:
        path = os.path.join(REGISTRY, os.path.basename(self.root.rstrip("/")))
        if on:
            os.makedirs(REGISTRY, exist_ok=True)
            with open(path, "w") as f:
                f.write(self.root)
        else:
            try:
                os.remove(path)
            except OSError:
                pass

    @staticmethod
    def _remove_hosts() -> None:
        try:
            with open("/etc/hosts") as f:
                lines = f.readlines()
            kept = [line for line in lines if HOSTS_MARK not in line]
            if kept != lines:
                with open("/etc/hosts", "w") as f:  # in place: /etc/hosts may be a bind mount
                    f.writelines(kept)
        except OSError as e:
            log.warning("could not clean /etc/hosts: %s", e)

    def _start_daemon(self, cmd: list[str], pidfile: str, what: str, logfile: str) -> int:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{what} failed to start ({' '.join(cmd)}): {out.stderr.strip()}\n{_tail(logfile)}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pid = _read_pid(pidfile)
            if pid and process_alive(pid):
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not start (pidfile {pidfile}); its log:\n{_tail(logfile)}")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        """Start munged, slurmctld, both slurmd's; return once both nodes are idle. Cleans up on failure."""
        try:
            self._write_config()
            with _hosts_lock():
                self._register(True)
                self._add_hosts()
            mdir = os.path.join(self.root, "munge")
            self._start_daemon(
                ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force",
                 f"--socket={self.munge_socket}", f"--pid-file={self._munge_pidfile()}",
                 f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"],
                self._munge_pidfile(), "munged", f"{mdir}/munged.log")
            self._start_daemon(["/usr/sbin/slurmctld", "-f", self.conf], self._ctld_pidfile(), "slurmctld",
                               f"{self.root}/slurmctld.log")
            for node in NODES:
                self._start_daemon(["/usr/sbin/slurmd", "-f", self.conf, "-N", node],
                                   self._slurmd_pidfile(node), f"slurmd {node}",
                                   f"{self.root}/{node}/slurmd.log")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            states = out.stdout.strip()
            lines = [line.split() for line in states.splitlines()]
            if len(lines) == len(NODES) and all(s[1] == "idle" for s in lines if len(s) == 2):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout}s: {states!r}\n{_tail(self.root + '/slurmctld.log')}")

    def stop(self) -> None:
        """Cancel every job, then stop each daemon by its pid (slurmd's, slurmctld, munged)."""
        if _read_pid(self._ctld_pidfile()):
            self.run("scancel", "--full", "--partition=debug", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                out = self.run("squeue", "-h", "-o", "%i", check=False)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.3)
        for pidfile in reversed(self.pidfiles()):
            pid = _read_pid(pidfile)
            if pid is not None:
                _stop_pid(pid)
                try:
                    os.remove(pidfile)
                except OSError:
                    pass
        with _hosts_lock():
            self._register(False)
            if not self._others_alive():
                self._remove_hosts()


@contextlib.contextmanager
def _hosts_lock() -> Iterator[None]:
    os.makedirs(REGISTRY, exist_ok=True)
    with open(os.path.join(REGISTRY, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return f"(no {path})"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", default=None, help="where the cluster keeps its files (start: a new temp dir)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if ns.action == "start":
        why = missing_requirement()
        if why:
            print(f"cannot start: {why}", file=sys.stderr)
            return 1
        install_packages()
        root = ns.dir or tempfile.mkdtemp(prefix="megalm-slurm-")
        os.makedirs(root, exist_ok=True)
        SlurmCluster(root).start()
        print(f"export SLURM_CONF={os.path.join(root, 'slurm.conf')}")
        return 0
    if not ns.dir:
        parser.error("stop needs --dir")
    SlurmCluster(ns.dir).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
