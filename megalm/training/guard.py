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
from typing import Any, Optional

import torch
import torch.distributed as dist


class NonFiniteGuard:
    def __init__(self) -> None:
        self.bad = False

    def observe(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self.bad = True

    def consume(self, extra_bad: bool = False) -> bool:
        flag = torch.tensor([1.0 if (self.bad or extra_bad) else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.bad = False
        return bool(flag.item())


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
