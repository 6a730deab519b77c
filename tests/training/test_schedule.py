"""LR schedules: warmup, each decay shape, min LR, and the LambdaLR DeepSpeed steps."""

import math

import pytest
import torch

from megalm.config import OptimConfig
from megalm.training.schedule import lr_at, scheduler_factory


def cfg(**kw):
    base = dict(lr=1.0, min_lr=0.1, warmup_iters=10, schedule="cosine")
    base.update(kw)
    return OptimConfig(**base)


def test_warmup_is_linear_from_first_step():
    c = cfg()
    assert lr_at(0, c, 100) == pytest.approx(0.1)
    assert lr_at(4, c, 100) == pytest.approx(0.5)
    assert lr_at(9, c, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_ends_at_min_lr(schedule):
    c = cfg(schedule=schedule)
    assert lr_at(10, c, 100) == pytest.approx(1.0)
    assert lr_at(100, c, 100) == pytest.approx(0.1)
    assert lr_at(500, c, 100) == pytest.approx(0.1)
    mid = lr_at(55, c, 100)
    assert mid == pytest.approx(0.55, abs=1e-6)  # both are at the midpoint halfway


def test_cosine_shape():
    c = cfg()
    frac = (30 - 10) / 90
    assert lr_at(30, c, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def test_constant_and_inverse_sqrt():
    assert lr_at(50, cfg(schedule="constant"), 100) == 1.0
    c = cfg(schedule="inverse_sqrt", min_lr=0.0)
    assert lr_at(39, c, 100) == pytest.approx(math.sqrt(10) / math.sqrt(40))


def test_wsd_stable_then_decays_in_last_fraction():
    c = cfg(schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_at(79, c, 100) == 1.0
    assert lr_at(90, c, 100) == pytest.approx(0.55)
    assert lr_at(100, c, 100) == pytest.approx(0.1)


def test_scheduler_factory_drives_optimizer():
    c = cfg(lr=0.5, min_lr=0.05, warmup_iters=2, schedule="linear")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=123.0)
    sched = scheduler_factory(c, 10)(opt)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(i, c, 10) for i in range(12)])
