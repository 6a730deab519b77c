"""The sbatch script's rendezvous on a real 2-node Slurm cluster, with a stand-in entry point.

Two ranks on the two fake nodes meet over gloo from the Slurm environment, independent of the
model code (test_slurm_pretrain.py runs the real training and the requeue cycle).
"""

from __future__ import annotations

import json
import os

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
