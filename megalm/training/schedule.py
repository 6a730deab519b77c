"""Learning-rate schedules: warmup, then constant / linear / cosine / inverse-sqrt / WSD decay to min_lr.

A pure function of the step, so resume needs only the step count; wrapped in a
LambdaLR that DeepSpeed steps (and checkpoints) with the optimizer.
"""

from __future__ import annotations

import math
from typing import Callable

from megalm.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_iters: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    peak, floor = optim.lr, optim.min_lr
    warmup = optim.warmup_iters
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "inverse_sqrt":
        return max(floor, peak * math.sqrt(max(warmup, 1)) / math.sqrt(max(step + 1, 1)))
    decay_end = optim.decay_iters or total_iters
    if optim.schedule == "wsd":
        decay_len = max(1, int(round(optim.wsd_decay_fraction * decay_end)))
        decay_start = decay_end - decay_len
        if step < decay_start:
            return peak
        frac = min(1.0, (step - decay_start) / decay_len)
        return floor + (peak - floor) * (1.0 - frac)
    span = max(1, decay_end - warmup)
    frac = min(1.0, max(0.0, (step - warmup) / span))
    if optim.schedule == "linear":
        return floor + (peak - floor) * (1.0 - frac)
    # cosine
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def scheduler_factory(optim: OptimConfig, total_iters: int) -> Callable:
    """A callable DeepSpeed turns into the scheduler once it has built the optimizer."""

    def make(optimizer):
        import torch

        for group in optimizer.param_groups:
            group["lr"] = optim.lr  # LambdaLR multiplies the base lr
            group.setdefault("initial_lr", optim.lr)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, optim, total_iters) / optim.lr if optim.lr else 0.0
        )

    return make
