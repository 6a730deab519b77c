"""Resumable pretraining sampler: the data position is one number, ``consumed_samples``.

Global batch g is the contiguous range of dataset indices
``[g*B, (g+1)*B)`` with B = micro_batch_size * dp_size (the dataset itself is
already shuffled); each DP rank takes its slice. Resuming from a global
count makes the position independent of the DP size it was saved under
(Megatron's MegatronPretrainingSampler semantics).
"""

from __future__ import annotations

from typing import Iterator

from megalm.errors import DataError


class PretrainingSampler:
    """Yields this rank's micro-batches (lists of sample indices), from ``consumed_samples`` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise DataError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0 or dp_size <= 0:
            raise DataError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if consumed_samples < 0 or consumed_samples > total_samples:
            raise DataError(f"consumed_samples {consumed_samples} outside [0, {total_samples}]")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.drop_last = drop_last

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        left = self.total_samples - self.consumed_samples
        return left // self.global_micro_batch if self.drop_last else -(-left // self.global_micro_batch)

    def _slice(self, start: int, stop: int) -> list[int]:
        lo = start + self.dp_rank * self.micro_batch_size
        return list(range(lo, min(lo + self.micro_batch_size, stop)))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.global_micro_batch
        start = self.consumed_samples
        while start + step <= self.total_samples:
            # advance first, so state_dict() taken after a yield counts the batch as consumed
            self.consumed_samples = start + step
            yield self._slice(start, start + step)
            start += step
        if not self.drop_last and start < self.total_samples:
            self.consumed_samples = self.total_samples
            part = self._slice(start, self.total_samples)
            if part:
                yield part

    def state_dict(self) -> dict:
        """What a checkpoint stores: the global position only (valid under any DP size)."""
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if not 0 <= consumed <= self.total_samples:
            raise DataError(f"checkpoint consumed_samples {consumed} outside [0, {self.total_samples}]")
        self.consumed_samples = consumed
