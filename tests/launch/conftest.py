"""Fixtures for the launch tests: one real two-node Slurm cluster per module, stopped by pid afterwards."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

from tests.launch.slurm_cluster import SlurmCluster, install_packages, missing_requirement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def slurm_cluster():
    why = missing_requirement()
    if why:
        pytest.skip(f"Slurm cluster tests: {why}")
    install_packages()
    root = tempfile.mkdtemp(prefix="megalm-slurm-")
    cluster = SlurmCluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def launch_env():
    """Environment knobs every CPU launch test shares: this checkout, this interpreter, one thread per rank."""
    return {"MEGALM_ROOT": REPO, "MEGALM_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
