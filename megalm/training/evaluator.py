"""Validation every ``train.eval_interval`` steps (and at the last), test data once at the end (as Megatron)."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from megalm.training.step import StepRunner
from megalm.training.step_log import StepLog

Batches = Optional[Callable[[], Iterator[dict]]]  # a factory of fresh iterators: the same batches every time


class Evaluator:
    def __init__(self, runner: StepRunner, log: StepLog, valid: Batches, test: Batches, iters: int,
                 every: int, train_iters: int):
        self.runner, self.log, self.valid, self.test = runner, log, valid, test
        self.iters, self.every, self.train_iters = iters, every, train_iters

    def maybe_run(self, step: int) -> None:
        due = step % self.every == 0 or step == self.train_iters
        if self.valid is not None and due and self.iters > 0:
            self.log.evaluated(step, "eval", self.runner.evaluate(self.valid(), self.iters))

    def run_test(self, step: int) -> None:
        if self.test is not None:
            self.log.evaluated(step, "test", self.runner.evaluate(self.test(), self.iters))
