"""Rank layout and groups: TP contiguous, then DP, then PP — the same as DeepSpeed's topology."""

import pytest
import torch
import torch.distributed as dist

from megalm.errors import ConfigError
from megalm.parallel import state
from tests.harness import run_ranks


def test_layout_matches_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    for pp, tp, world in [(2, 2, 8), (1, 2, 4), (2, 1, 4), (2, 4, 8)]:
        dp = world // (pp * tp)
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        groups = state.layout(world, tp, pp)
        for r in range(world):
            c = topo.get_coord(r)
            tp_group = next(g for g in groups["tensor"] if r in g)
            assert tp_group == topo.filter_match(pipe=c.pipe, data=c.data)
            dp_group = next(g for g in groups["data"] if r in g)
            assert dp_group == topo.filter_match(pipe=c.pipe, model=c.model)
            pp_group = next(g for g in groups["pipeline"] if r in g)
            assert pp_group == topo.filter_match(data=c.data, model=c.model)


def test_layout_rejects_bad_world():
    with pytest.raises(ConfigError, match="divisible"):
        state.layout(6, 4, 1)


def test_uninitialised_is_one_rank():
    state.destroy()
    assert not state.is_initialized()
    assert (state.tensor_size(), state.tensor_rank(), state.data_size(), state.pipeline_size()) == (1, 0, 1, 1)
    assert state.tensor_group() is None
    state.initialize(1, 1)  # no torch.distributed needed for the trivial layout
    assert not state.is_initialized()


def _groups(rank, world_size):
    state.initialize(2, 2)
    mpu = state.mpu()
    out = {"tp": (state.tensor_rank(), state.tensor_size()), "dp": (state.data_rank(), state.data_size()),
           "pp": (state.pipeline_rank(), state.pipeline_size())}
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=state.tensor_group())
    out["tp_sum"] = t.item()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mpu.get_data_parallel_group())
    out["dp_sum"] = t.item()
    assert mpu.get_tensor_model_parallel_world_size() == 2
    assert mpu.get_model_parallel_rank() == state.tensor_rank()
    state.destroy()

    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    grid = PipelineParallelGrid(topology=PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
    state.initialize_from_grid(grid)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=state.tensor_group())
    out["grid"] = (state.tensor_rank(), state.tensor_size(), state.pipeline_rank(), t.item())
    state.destroy()
    return out


@pytest.mark.slow
def test_groups_on_four_ranks():
    res = run_ranks(_groups, 4)
    # world 4 = pp 2 x dp 1 x tp 2: ranks 0,1 stage 0; 2,3 stage 1
    for r, out in enumerate(res):
        assert out["tp"] == (r % 2, 2)
        assert out["dp"] == (0, 1)
        assert out["pp"] == (r // 2, 2)
        assert out["tp_sum"] == (0 + 1 if r < 2 else 2 + 3)
        assert out["dp_sum"] == r
        assert out["grid"] == (r % 2, 2, r // 2, 1.0 if r < 2 else 5.0)
