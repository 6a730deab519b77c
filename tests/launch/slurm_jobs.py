"""Submitting a launch script to the test cluster and waiting for it: small helpers for test_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.launch.slurm_cluster import SlurmCluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The CPU overrides of the GPU header: one task per fake node (the 8 fake GPUs stay requested).
CPU_SBATCH_ARGS = ("--ntasks-per-node=1",)


def submit(cluster: SlurmCluster, script: str, workdir: str, env: dict, args: list[str]) -> str:
    """sbatch ``launch/<script>`` from ``workdir`` with ``env`` on top of the cluster's; return the job id."""
    full_env = dict(cluster.env, **env)
    out = subprocess.run(
        ["sbatch", "--parsable", *CPU_SBATCH_ARGS, f"--output={workdir}/%x-%j.out",
         os.path.join(REPO, "launch", script), *args],
        cwd=workdir, env=full_env, capture_output=True, text=True, timeout=30,
    )
    if out.returncode != 0:
        raise AssertionError(f"sbatch failed: {out.stderr}")
    return out.stdout.strip().split(";")[0]


def job_log(workdir: str, job_id: str) -> str:
    for name in os.listdir(workdir):
        if name.endswith(f"-{job_id}.out"):
            with open(os.path.join(workdir, name), errors="replace") as f:
                return f.read()
    return "(no job output file)"


def wait_for(cluster: SlurmCluster, job_id: str, states: tuple, timeout: float, workdir: str) -> dict:
    """Poll until the job is in one of ``states`` (a requeued job restarts after CRED_EXPIRE seconds)."""
    deadline = time.monotonic() + timeout
    info: dict = {}
    seen: list = []
    final_polls = 0
    while time.monotonic() < deadline:
        info = cluster.job_state(job_id)
        state = info.get("JobState")
        summary = (state, info.get("Restarts"), info.get("ExitCode"), info.get("Reason"))
        if not seen or seen[-1] != summary:
            seen.append(summary)
        if state in states:
            return info
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            final_polls += 1  # a requeue can pass through a final-looking state: believe it after ~3 s
            if final_polls >= 4:
                break
            time.sleep(1.0)
            continue
        final_polls = 0
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} reached {info.get('JobState')} (wanted {states}); "
                         f"(state, restarts, exit code, reason) seen: {seen}; log:\n{job_log(workdir, job_id)}")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
