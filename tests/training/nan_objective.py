"""A user objective for tests: causal LM whose loss turns NaN on chosen global steps.

objective.options.nan_steps lists 1-based optimizer steps; nan_from makes every step from there on NaN.
"""

import torch

from megalm.objectives.clm import CausalLM


class NaNOnSteps(CausalLM):
    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.calls = 0
        self.per_step = cfg.grad_accum_steps(1)  # single process in these tests

    def loss(self, output, targets):
        loss = super().loss(output, targets)
        step = self.calls // self.per_step + 1
        self.calls += 1
        opts = self.cfg.objective.options
        if step in opts.get("nan_steps", []) or step >= opts.get("nan_from", 10**9):
            loss = loss * torch.tensor(float("nan"))
        return loss
