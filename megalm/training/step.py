"""One optimizer step and one evaluation pass, under either DeepSpeed engine (plain or pipeline).

One optimizer step = ``grad_accum`` micro-batches on each data-parallel rank
(or one ``train_batch`` of the pipeline engine); every value returned is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from megalm.objectives.base import Objective
from megalm.parallel import comm
from megalm.training.engine import Engine


@dataclass(frozen=True)
class StepResult:
    loss: float  # global mean loss of the step (NaN/inf when the step was non-finite)
    tokens: int  # tokens this data-parallel rank processed
    metrics: dict = field(default_factory=dict)  # the objective's own numbers, DP-averaged


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def dp_mean(value, engine: Engine) -> float:
    """Mean of a float or a one-element tensor over the data-parallel ranks (one sync)."""
    from megalm.parallel import state

    return comm.reduce_scalar(value, "mean", state.data_group() if engine.dp_size > 1 else None)


class PipeFeed:
    """Adapts a batch iterator to what DeepSpeed's pipeline engine pulls: (inputs, targets) tuples."""

    def __init__(self, batches: Iterator[dict], objective: Objective, device: torch.device):
        self.batches, self.objective, self.device = batches, objective, device
        self.tokens = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = to_device(next(self.batches), self.device)
        self.tokens += self.objective.tokens_in(batch)
        return self.objective.pipeline_inputs(batch), self.objective.targets(batch)


class StepRunner:
    """Runs training steps and evaluation passes of ``engine`` on batches of ``objective``."""

    def __init__(self, engine: Engine, objective: Objective, grad_accum: int, device: torch.device):
        self.engine, self.objective, self.grad_accum, self.device = engine, objective, grad_accum, device

    def train(self, batches: Iterator[dict]) -> StepResult:
        """One optimizer step."""
        engine, objective, ds = self.engine, self.objective, self.engine.ds
        if engine.pipeline:
            feed = PipeFeed(batches, objective, self.device)
            loss = ds.train_batch(data_iter=feed)
            # The pipeline engine broadcasts the DP-averaged loss from the last stage to all stages.
            return StepResult(float(loss.item()), feed.tokens or self._stage_tokens())
        losses, tokens, extras = [], 0, {}
        for _ in range(self.grad_accum):
            batch = to_device(next(batches), self.device)
            tokens += objective.tokens_in(batch)
            out = ds(**objective.inputs(batch))
            targets = objective.targets(batch)
            loss = engine.loss(out, targets)
            ds.backward(loss)
            ds.step()
            losses.append(loss.detach())
            with torch.no_grad():
                for k, v in objective.metrics(out, targets).items():
                    extras.setdefault(k, []).append(torch.as_tensor(v, device=loss.device).detach().float())
        return self._reduce(losses, extras, tokens)

    def _reduce(self, losses: list, extras: dict, tokens: int) -> StepResult:
        """The step's loss and metrics, averaged over micro-batches and DP ranks in one all-reduce and one
        host copy (on CUDA each float() of a device value would be a sync of its own)."""
        from megalm.parallel import state

        names = sorted(extras)
        values = torch.stack([torch.stack(losses).float().mean()] +
                             [torch.stack([x.reshape(()) for x in extras[k]]).mean() for k in names])
        group = state.data_group() if self.engine.dp_size > 1 else None
        means = comm.all_reduce(values, "mean", group).tolist()
        return StepResult(means[0], tokens, dict(zip(names, means[1:])))

    def _stage_tokens(self) -> int:
        # Middle pipeline stages pull no data; count what the first stage saw.
        cfg = self.objective.cfg
        return self.grad_accum * cfg.train.micro_batch_size * cfg.model.seq_length

    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict], iters: int) -> float:
        """Mean loss over ``iters`` global batches."""
        engine, objective, ds = self.engine, self.objective, self.engine.ds
        total = 0.0
        if engine.pipeline:
            for _ in range(iters):
                total += float(ds.eval_batch(data_iter=PipeFeed(batches, objective, self.device)).item())
            ds.train()
            engine.guard.reset()  # eval losses go through the same loss_fn; they never skip a step
            return total / iters
        ds.eval()
        losses = []
        for _ in range(iters * self.grad_accum):
            batch = to_device(next(batches), self.device)
            out = ds(**objective.inputs(batch))
            losses.append(objective.loss(out, objective.targets(batch)).detach())
        ds.train()
        return dp_mean(torch.stack(losses).mean(), engine)
