"""Rank discovery from each launcher's environment."""

import pytest

from megalm.distributed import discover


def test_torchrun_env_is_kept():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert discover(env) == "torchrun/deepspeed"
    assert (env["RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("3", "n1", "1234")


def test_slurm_step_env():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node7", "MASTER_ADDR": "node7"}
    assert discover(env) == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_PORT"] == str(20000 + 4242)


def test_slurm_batch_step_without_srun_is_single():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}  # python run in the batch script
    assert discover(env) == "single"
    assert env["WORLD_SIZE"] == "1"


def test_plain_python_is_single_rank():
    env = {}
    assert discover(env) == "single"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert int(env["MASTER_PORT"]) > 0


@pytest.mark.parametrize("key", ["OMPI_COMM_WORLD_SIZE"])
def test_mpi_env_uses_mpi4py(key):
    pytest.importorskip("mpi4py")
    env = {key: "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert discover(env) == "mpi"
    assert (env["RANK"], env["WORLD_SIZE"]) == ("0", "1")
