"""One machine, three launchers: launch/torchrun_local.sh, launch/deepspeed_local.sh and plain
``mpirun -np 2 python megalm/pretrain.py`` (rank discovery through mpi4py) train the same 2-rank run
to the same losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.launch.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

ITERS = 3


def _run(cmd: list[str], run_dir: str, extra_env: dict) -> tuple[str, list[float]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGALM_PYTHON=sys.executable, **extra_env)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return log, losses


@pytest.fixture(scope="module")
def torchrun_losses(tiny_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("torchrun") / "run")
    log, losses = _run([os.path.join(REPO, "launch", "torchrun_local.sh"), *tiny_overrides(tiny_data, run_dir, ITERS)],
                       run_dir, {"NPROC": "2"})
    assert "2 rank(s) via" in log
    assert len(losses) == ITERS
    return losses


def test_torchrun_local(torchrun_losses):
    assert all(0 < loss < 20 for loss in torchrun_losses)


def test_deepspeed_local_matches_torchrun(tiny_data, tmp_path, torchrun_losses):
    run_dir = str(tmp_path / "run")
    log, losses = _run([os.path.join(REPO, "launch", "deepspeed_local.sh"), *tiny_overrides(tiny_data, run_dir, ITERS)],
                       run_dir, {"NPROC": "2"})
    assert "2 rank(s) via" in log
    assert losses == torchrun_losses


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed (apt-get install openmpi-bin)")
def test_mpirun_matches_torchrun(tiny_data, tmp_path, torchrun_losses):
    run_dir = str(tmp_path / "run")
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    cmd = ["mpirun", "-np", "2", "-x", "OMP_NUM_THREADS", sys.executable, os.path.join(REPO, "megalm", "pretrain.py"),
           "--config", os.path.join(REPO, "configs", "gpt_tiny.yaml"), *tiny_overrides(tiny_data, run_dir, ITERS)]
    log, losses = _run(cmd, run_dir, env)
    assert "2 rank(s) via mpi" in log
    assert losses == torchrun_losses
