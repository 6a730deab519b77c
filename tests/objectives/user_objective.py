"""A user's own objective, outside megalm: predict the token ``options.shift`` places ahead (skip-gram-ish LM).

Loaded by ``objective.name: tests.objectives.user_objective:SkipAheadLM``; it
reads its options from ``objective.options`` and touches ``options.marker``
so a test can see that this class, not a built-in, did the training.
"""

from __future__ import annotations

import numpy as np
import torch

from megalm.objectives.base import Objective


class SkipAheadLM(Objective):
    name = "skip_ahead"
    dataset_kind = "gpt"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.shift = int(cfg.objective.options.get("shift", 2))
        marker = cfg.objective.options.get("marker")
        if marker:
            with open(marker, "a") as f:
                f.write(f"{self.name} shift={self.shift}\n")

    def collate(self, samples, rng):
        tokens = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
        input_ids = tokens[:, :-1].contiguous()
        b, s = input_ids.shape
        labels = torch.zeros_like(input_ids)
        labels[:, : s + 1 - self.shift] = tokens[:, self.shift:]
        loss_mask = torch.zeros(b, s)
        loss_mask[:, : s + 1 - self.shift] = 1.0
        return {"input_ids": input_ids, "position_ids": torch.arange(s).expand(b, s).contiguous(),
                "labels": labels, "loss_mask": loss_mask}

    def targets(self, batch):
        return batch["labels"], batch["loss_mask"]

    def loss(self, output, targets):
        from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

        labels, mask = targets
        per_token = vocab_parallel_cross_entropy(output.float(), labels)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
