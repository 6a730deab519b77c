"""The sbatch script's machinery on a real 2-node Slurm cluster, with a stand-in training entry point.

Rendezvous across the two fake nodes (gloo all-reduce from the Slurm environment), and the
USR1 -> checkpoint -> exit 75 -> scontrol requeue -> resume cycle, independent of the model code.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.launch.slurm_jobs import job_log, read_metrics, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STANDIN = {"MEGALM_ENTRY": "tests/launch/standin_train.py", "MEGALM_CONFIG": "configs/gpt_tiny.yaml"}


def _ranks(run_dir: str) -> list[dict]:
    rows = []
    for r in (0, 1):
        with open(os.path.join(run_dir, f"rank{r}.json")) as f:
            rows += [json.loads(line) for line in f]
    return rows


def test_two_ranks_on_two_nodes_meet(slurm_cluster, launch_env, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, "pretrain_gpt_1b.sh", str(tmp_path), dict(launch_env, **STANDIN),
                 [f"--set=run.dir={run_dir}", "--set=train.iters=3", "--set=step_seconds=0"])
    info = wait_for(slurm_cluster, job, ("COMPLETED",), 60, str(tmp_path))
    assert info["ExitCode"] == "0:0"
    ranks = _ranks(str(run_dir))
    assert sorted((r["rank"], r["node"], r["world"]) for r in ranks) == [(0, "megalm-n1", 2), (1, "megalm-n2", 2)]
    # MASTER_ADDR is the allocation's first host; both ranks got the address the script chose
    log = job_log(str(tmp_path), job)
    assert {r["master"] for r in ranks} == {log.split("master ")[1].split(",")[0]}
    assert log.split("master ")[1].startswith("megalm-n1:")
    metrics = read_metrics(str(run_dir))
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["sum"] == 3.0 for m in metrics)
    assert "training exited with 0" in job_log(str(tmp_path), job)


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, launch_env, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, "pretrain_gpt_1b.sh", str(tmp_path), dict(launch_env, **STANDIN),
                 [f"--set=run.dir={run_dir}", "--set=train.iters=30", "--set=step_seconds=0.15"])
    deadline = time.monotonic() + 60
    while len(read_metrics(str(run_dir))) < 5:
        assert time.monotonic() < deadline, job_log(str(tmp_path), job)
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_for(slurm_cluster, job, ("COMPLETED",), 90, str(tmp_path))
    log = job_log(str(tmp_path), job)
    assert info["Restarts"] == "1", log
    assert "requeueing (restart 1)" in log
    ranks = _ranks(str(run_dir))
    resumed = [r["resumed_from"] for r in ranks if r["restart"] == "1"]
    assert len(resumed) == 2 and resumed[0] == resumed[1] and 5 <= resumed[0] < 30, ranks
    # every step exactly once: the rerun continued where the checkpoint left off
    assert [m["step"] for m in read_metrics(str(run_dir))] == list(range(1, 31))
