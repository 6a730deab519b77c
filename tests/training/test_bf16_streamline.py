"""ds_state.streamline_bf16 changes speed, not numbers: the same bits as DeepSpeed's own bf16 bookkeeping.

Two engines from one seed train the same batches (2 micro-batches per step, so gradients really
accumulate): one as build_engine leaves it (streamlined), one with DeepSpeed's methods put back.
On one rank the identity all-reduce is skipped too; on two it must still run.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.harness import run_ranks

SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
         "model.vocab_size=120", "model.make_vocab_size_divisible_by=8", "train.micro_batch_size=2",
         "precision=bf16", "optim.clip_grad=0.5", "train.compile=none"]


def _train(rank, world_size, streamlined: bool, steps: int = 3):
    from megalm import config as C
    from megalm.objectives import build_objective
    from megalm.parallel import state
    from megalm.training.engine import build_engine
    from tests.objectives.conftest import ToyTokenizer

    cfg, ds_cfg = C.resolve(None, SHAPE + [f"train.global_batch_size={4 * world_size}"], None, world_size)
    engine = build_engine(cfg, ds_cfg, 120, build_objective(cfg, ToyTokenizer()))
    ds, opt = engine.ds, engine.ds.optimizer
    applied = {"accumulate": "_update_hp_grad" in vars(opt), "allreduce": ds.enable_backward_allreduce}
    if not streamlined:  # DeepSpeed's own path
        del opt._update_hp_grad
        ds.enable_backward_allreduce = True
    g = torch.Generator().manual_seed(1 + rank)
    losses = []
    for _ in range(steps * 2):
        ids = torch.randint(0, 120, (2, 17), generator=g)
        out = ds(ids[:, :-1], position_ids=torch.arange(16).expand(2, 16))
        loss = engine.loss(out, (ids[:, 1:], torch.ones(2, 16)))
        ds.backward(loss)
        ds.step()
        losses.append(loss.item())
    result = {"applied": applied, "losses": losses, "grad_norm": float(ds.get_global_grad_norm()),
              "params": [p.detach().clone() for p in ds.module.parameters()],
              "masters": [t.detach().clone() for t in opt.fp32_groups_flat_partition]}
    state.destroy()
    return result


def _both(rank, world_size):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from megalm.distributed import _disable_cpu_shm_comm

    _disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    return _train(rank, world_size, True), _train(rank, world_size, False)


def _same_bits(fast: dict, ref: dict) -> None:
    assert fast["losses"] == ref["losses"]
    assert fast["grad_norm"] == ref["grad_norm"]
    for a, b in zip(fast["params"] + fast["masters"], ref["params"] + ref["masters"]):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_streamlined_bf16_steps_equal_deepspeeds_bit_for_bit(world_size):
    for fast, ref in run_ranks(_both, world_size, timeout=240):
        assert fast["applied"]["accumulate"]
        # the identity all-reduce is skipped on one data-parallel rank only
        assert fast["applied"]["allreduce"] is (world_size > 1)
        _same_bits(fast, ref)
        assert fast["losses"][0] != fast["losses"][-1]  # it trained
