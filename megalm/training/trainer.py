"""The training loop: a Trainer whose parts decide their own timing.

StepRunner runs a step; NonFinitePolicy, StepLog, Evaluator, the Checkpointer and
the StopRules each look at the step just finished and act when it is their turn.
The loop itself only keeps the position (step, consumed samples) and passes it on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from megalm.config import Config
from megalm.objectives.base import Objective
from megalm.training.engine import Engine
from megalm.training.evaluator import Batches, Evaluator
from megalm.training.nonfinite import NonFinitePolicy
from megalm.training.step import StepRunner
from megalm.training.step_log import StepLog
from megalm.training.stop_rules import ExitDuration, ExitInterval, Preemption, StopRules

logger = logging.getLogger("megalm")


@dataclass
class Trainer:
    runner: StepRunner
    batches: Iterator[dict]
    checkpointer: Any  # megalm.training.checkpoint.manager.Checkpointer
    evaluator: Evaluator
    log: StepLog
    nonfinite: NonFinitePolicy
    stops: StopRules
    iters: int
    global_batch_size: int
    save_at_end: bool
    rank: int

    def train(self, step: int, consumed_samples: int) -> int:
        """Train from ``step`` (``consumed_samples`` in) to ``train.iters``; return the process exit code."""
        start = step
        self.log.begin(start)
        try:
            while step < self.iters:
                result = self.runner.train(self.batches)
                step, consumed_samples = step + 1, consumed_samples + self.global_batch_size
                self.nonfinite.after_step(step, result.loss, consumed_samples)  # raises when it gives up
                self.log.after_step(step, result, consumed_samples)
                self.evaluator.maybe_run(step)
                self.checkpointer.maybe_save(step, consumed_samples)
                stop = self.stops.check(step)
                if stop is not None:
                    self.checkpointer.ensure_saved(step, consumed_samples)
                    if self.rank == 0:
                        logger.log(stop.level, stop.message)
                    return stop.code
            if step > start:
                self.evaluator.run_test(step)
                if self.save_at_end:
                    self.checkpointer.save(step, consumed_samples)
            return 0
        finally:
            self.stops.close()
            self.log.close()


def build_trainer(cfg: Config, *, engine: Engine, objective: Objective, checkpointer: Any,
                  train: Iterator[dict], valid: Batches, test: Batches, device: torch.device, world_size: int,
                  rank: int, preemption: Optional[Preemption] = None) -> Trainer:
    """The Trainer for ``cfg`` from the parts the entry point built (engine, checkpointer, batches)."""
    t = cfg.train
    runner = StepRunner(engine, objective, cfg.grad_accum_steps(world_size), device)
    log = StepLog(cfg, engine.ds, engine.dp_size, device, world_size, rank)
    return Trainer(
        runner=runner, batches=train, checkpointer=checkpointer,
        evaluator=Evaluator(runner, log, valid, test, t.eval_iters, t.eval_interval, t.iters), log=log,
        nonfinite=NonFinitePolicy(engine.ds, checkpointer, t.max_skipped_steps, cfg.precision == "fp16", rank),
        stops=StopRules(preemption or Preemption(), ExitInterval(t.exit_interval, t.iters),
                        ExitDuration(t.exit_duration_minutes)),
        iters=t.iters, global_batch_size=t.global_batch_size, save_at_end=cfg.checkpoint.save_at_end, rank=rank)
