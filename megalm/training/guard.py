"""Skip optimizer steps whose loss or gradient norm is not finite, in every precision.

fp16 skips overflowing steps through DeepSpeed's loss scaler; bf16 and fp32
have no such guard in DeepSpeed, and one NaN step would poison the weights.
The objective's loss is observed on the rank that computes it; right before the
optimizer step all ranks agree (one all-reduce) whether to skip, and a skipped
step is booked as DeepSpeed books an fp16 overflow (no update, no LR step,
``skipped_steps += 1``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from megalm.parallel import comm


class NonFiniteGuard:
    def __init__(self) -> None:
        self.bad: Union[bool, torch.Tensor] = False  # a 0-dim bool tensor on the loss's device once observed

    def observe(self, loss: torch.Tensor) -> None:
        # stays on the loss's device: no host sync per micro-batch; consume() syncs once per step
        bad = ~torch.isfinite(loss.detach()).all()
        self.bad = bad if self.bad is False else (self.bad | bad)

    def consume(self, extra_bad: bool = False) -> bool:
        bad = comm.any_rank(True if extra_bad else self.bad)
        self.bad = False
        return bad


def _skip_step(ds: Any) -> None:
    if ds.zero_optimization() or ds.fp16_enabled() or ds.bfloat16_enabled():
        ds.optimizer.zero_grad()
    else:
        ds.zero_grad()
    ds._step_applied = False
    ds.skipped_steps += 1
    ds.losses = None
    ds.global_steps += 1
    ds.global_samples += ds.train_batch_size()


def install(ds: Any, guard: NonFiniteGuard, clip: Optional[float]) -> None:
    """Wrap ``ds._take_model_step``: megalm's clipping when ``clip`` is not None, then the skip decision."""
    from megalm.training import grad_norm

    params = [p for p in ds.module.parameters() if p.requires_grad]
    original = ds._take_model_step

    def take_model_step(*args, **kwargs):
        norm = None
        if clip is not None:
            norm = grad_norm.clip_(params, clip)
            ds._global_grad_norm = norm
        if guard.consume(extra_bad=norm is not None and not math.isfinite(norm)):
            _skip_step(ds)
            return None
        return original(*args, **kwargs)

    ds._take_model_step = take_model_step
