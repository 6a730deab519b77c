"""The container recipe of docs/cluster.md on the Slurm test cluster (a real Slurm install,
two `slurmd` nodes on one host, CPU/gloo): the batch script
runs from a host checkout (MEGALM_ROOT) that holds only launch/, while every task -- the `megalm
check` preflight and both ranks -- runs through a stand-in container wrapper (fake_container.sh, in
place of `apptainer exec`) on the code at the in-image path (MEGALM_IMAGE_ROOT)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.launch.conftest import REPO, tiny_overrides
from tests.launch.slurm_jobs import job_log, read_metrics, submit, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _container_env(launch_env: dict, tmp_path) -> dict:
    host = tmp_path / "host_checkout"  # what sbatch runs from: the launch scripts, no megalm package
    shutil.copytree(os.path.join(REPO, "launch"), host / "launch")
    image = tmp_path / "image"
    (image / "opt").mkdir(parents=True)
    os.symlink(REPO, image / "opt" / "megalm")  # the code at its in-image path
    wrapper = os.path.join(REPO, "tests", "launch", "fake_container.sh")
    return dict(launch_env, MEGALM_ROOT=str(host), MEGALM_IMAGE_ROOT=str(image / "opt" / "megalm"),
                MEGALM_CONFIG="configs/gpt_tiny.yaml", MEGALM_CONTAINER=f"{wrapper} {image}",
                FAKE_CONTAINER_HOST_ROOT=str(host), FAKE_CONTAINER_LOG=str(tmp_path / "container.log"))


def test_training_runs_inside_the_stand_in_container(slurm_cluster, tiny_data, launch_env, tmp_path):
    env = _container_env(launch_env, tmp_path)
    run_dir = str(tmp_path / "run")
    job = submit(slurm_cluster, "pretrain_gpt_1b.sh", str(tmp_path), env, tiny_overrides(tiny_data, run_dir, 3))
    info = wait_for(slurm_cluster, job, ("COMPLETED",), 120, str(tmp_path))
    log = job_log(str(tmp_path), job)
    assert info["ExitCode"] == "0:0", log
    assert "ready on 2 rank(s)" in log, log  # the preflight ran, in the container, for the whole job
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [1, 2, 3]
    with open(tmp_path / "container.log") as f:
        uses = [line.split(" ", 2) for line in f]
    image_entry = f"{env['MEGALM_IMAGE_ROOT']}/megalm/pretrain.py"
    checks = [u for u in uses if "--check" in u[2]]
    ranks = sorted(u[1] for u in uses if "--check" not in u[2])
    assert len(checks) == 1 and ranks == ["0", "1"], uses
    assert all(image_entry in u[2] for u in uses), uses


def test_a_failed_check_stops_the_job_before_srun_starts_ranks(slurm_cluster, tiny_data, launch_env, tmp_path):
    env = _container_env(launch_env, tmp_path)
    run_dir = str(tmp_path / "run")
    data = dict(tiny_data, prefix=str(tmp_path / "missing_text_document"))
    job = submit(slurm_cluster, "pretrain_gpt_1b.sh", str(tmp_path), env, tiny_overrides(data, run_dir, 3))
    info = wait_for(slurm_cluster, job, ("FAILED",), 60, str(tmp_path))
    log = job_log(str(tmp_path), job)
    assert info["ExitCode"].startswith("2:"), (info, log)
    assert f"FAIL data: data.prefix: {tmp_path}/missing_text_document.bin not found" in log, log
    assert "not starting the ranks" in log and "rank(s) via" not in log, log
