"""Non-finite steps: each one skipped, in every precision; too many in a row end the run.

fp16 skips overflowing steps through DeepSpeed's loss scaler; bf16 and fp32
have no such guard in DeepSpeed, and one NaN step would poison the weights.
The objective's loss is observed on the rank that computes it; right before the
optimizer step all ranks agree (one all-reduce) whether to skip (NonFiniteGuard).
After each step the loop asks NonFinitePolicy, which counts consecutive skips and
after ``train.max_skipped_steps`` saves a diagnostic checkpoint and raises.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Union

import torch

from megalm.errors import NonFiniteError
from megalm.parallel import comm
from megalm.training import ds_state

logger = logging.getLogger("megalm")


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

    def reset(self) -> None:
        """Forget what was observed without deciding a step (evaluation losses never skip one)."""
        self.bad = False


def install(ds: Any, guard: NonFiniteGuard, clip: Optional[float]) -> None:
    """Before each optimizer step: megalm's clipping when ``clip`` is not None, then the skip decision."""
    from megalm.training import grad_norm

    params = [p for p in ds.module.parameters() if p.requires_grad]

    def skip() -> bool:
        norm = None
        if clip is not None:
            norm = grad_norm.clip_(params, clip)
            ds_state.set_global_grad_norm(ds, norm)
        return guard.consume(extra_bad=norm is not None and not math.isfinite(norm))

    ds_state.wrap_model_step(ds, skip)


class NonFinitePolicy:
    """Counts consecutive skipped steps; at ``max_skipped`` saves a diagnostic checkpoint and raises.

    fp16 skips with a finite loss are the loss scaler calibrating, not a sick run: they do not count.
    """

    def __init__(self, ds: Any, checkpointer: Any, max_skipped: int, fp16: bool, rank: int):
        self.ds, self.checkpointer, self.max_skipped, self.fp16, self.rank = ds, checkpointer, max_skipped, fp16, rank
        self.seen = ds_state.skipped_steps(ds)
        self.in_a_row = 0

    def after_step(self, step: int, loss: float, consumed_samples: int) -> None:
        now = ds_state.skipped_steps(self.ds)
        skipped, self.seen = now > self.seen, now
        if not skipped or (self.fp16 and math.isfinite(loss)):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.rank == 0:
            logger.warning(f"step {step}: non-finite loss or gradient norm; update skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_skipped:
            self.checkpointer.save(step, consumed_samples, diagnostic=True)
            raise NonFiniteError(
                f"{self.in_a_row} consecutive steps had a non-finite loss or gradient norm (last at step {step}); "
                f"their updates were skipped and a diagnostic checkpoint was saved in {self.checkpointer.root}. "
                f"Lower optim.lr, check the data, or use bf16 instead of fp16.")
