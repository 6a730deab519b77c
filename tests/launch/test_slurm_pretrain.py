"""launch/pretrain_gpt_1b.sh, unchanged, training for real on a 2-node Slurm cluster (CPU overrides).

Two ranks (one per fake node) train a tiny GPT over gloo, checkpoint and exit 0; then the same
run is preempted with USR1 mid-way, checkpoints, requeues itself, resumes and must end with the
very same loss as the uninterrupted run. The BERT and PLM scripts train a few steps the same way.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.launch.conftest import tiny_overrides
from tests.launch.slurm_jobs import job_log, read_metrics, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ITERS = 40  # long enough that USR1 lands mid-run even on a fast machine
CPU_ENV = {"MEGALM_CONFIG": "configs/gpt_tiny.yaml"}  # gpt_1b's shape does not fit a CPU test


def _train_losses(run_dir: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_data, launch_env, tmp_path_factory):
    """The uninterrupted run: its job info, run dir and per-step losses."""
    work = tmp_path_factory.mktemp("slurm_ref")
    run_dir = str(work / "run")
    job = submit(slurm_cluster, "pretrain_gpt_1b.sh", str(work), dict(launch_env, **CPU_ENV),
                 tiny_overrides(tiny_data, run_dir, ITERS, **{"checkpoint.interval": 10}))
    info = wait_for(slurm_cluster, job, ("COMPLETED",), 120, str(work))
    return {"info": info, "run_dir": run_dir, "log": job_log(str(work), job), "losses": _train_losses(run_dir)}


def test_two_nodes_train_checkpoint_and_exit_0(reference):
    info, log = reference["info"], reference["log"]
    assert info["ExitCode"] == "0:0", log
    assert info["NodeList"] == "megalm-n[1-2]" and info["NumTasks"] == "2", info
    assert "2 rank(s) via" in log and "(gloo)" in log, log
    assert sorted(reference["losses"]) == list(range(1, ITERS + 1))
    ckpts = sorted(os.listdir(os.path.join(reference["run_dir"], "checkpoints")))
    assert f"step_{ITERS:08d}" in ckpts, ckpts  # the final save
    assert "training exited with 0" in log


def test_usr1_requeue_resumes_to_the_same_loss(slurm_cluster, reference, tiny_data, launch_env, tmp_path):
    run_dir = str(tmp_path / "run")
    job = submit(slurm_cluster, "pretrain_gpt_1b.sh", str(tmp_path), dict(launch_env, **CPU_ENV),
                 tiny_overrides(tiny_data, run_dir, ITERS, **{"checkpoint.interval": 10}))
    deadline = time.monotonic() + 90
    while max(_train_losses(run_dir), default=0) < 3:  # mid-run: training has really started
        assert time.monotonic() < deadline, job_log(str(tmp_path), job)
        assert slurm_cluster.job_state(job).get("JobState") in ("PENDING", "RUNNING"), job_log(str(tmp_path), job)
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_for(slurm_cluster, job, ("COMPLETED",), 150, str(tmp_path))
    log = job_log(str(tmp_path), job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", log
    assert "got USR1" in log and "requeueing (restart 1)" in log, log
    preempted_at = int(log.split("preempted at step ")[1].split(":")[0])
    assert 3 <= preempted_at < ITERS, log
    assert "resum" in log.lower(), log  # the rerun said it resumed from the checkpoint
    print(log)
    losses = _train_losses(run_dir)
    assert sorted(losses) == list(range(1, ITERS + 1))
    # the rerun continued from the checkpoint: every step's loss, the last included, is the uninterrupted run's
    assert losses == reference["losses"]


@pytest.mark.parametrize("script,config,data_key", [
    ("pretrain_bert_base.sh", "configs/bert_tiny.yaml", "sentence_prefix"),
    ("pretrain_plm_base.sh", "configs/plm_tiny.yaml", "prefix"),
])
def test_bert_and_plm_scripts_train_on_two_nodes(slurm_cluster, tiny_data, launch_env, tmp_path, script, config, data_key):
    run_dir = str(tmp_path / "run")
    data = dict(tiny_data, prefix=tiny_data[data_key])
    job = submit(slurm_cluster, script, str(tmp_path), dict(launch_env, MEGALM_CONFIG=config),
                 tiny_overrides(data, run_dir, 3))
    info = wait_for(slurm_cluster, job, ("COMPLETED",), 120, str(tmp_path))
    log = job_log(str(tmp_path), job)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "megalm-n[1-2]", log
    assert "2 rank(s) via" in log
    assert sorted(_train_losses(run_dir)) == [1, 2, 3]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000003"))
