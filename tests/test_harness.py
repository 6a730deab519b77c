"""The multi-rank harness itself: results come back by rank, failures carry the rank's traceback."""

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_ranks


def _allreduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


@pytest.mark.slow
def test_run_ranks_allreduce():
    assert run_ranks(_allreduce, 2) == [3.0, 3.0]


@pytest.mark.slow
def test_run_ranks_reports_failure():
    with pytest.raises(AssertionError, match="(?s)rank 1 failed.*boom on rank 1"):
        run_ranks(_fail_on_one, 2, timeout=60)
