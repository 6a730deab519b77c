"""The Trainer's parts decide their own timing: saves, stops and the non-finite policy, without processes.

The step runner and the log are stand-ins; the checkpointer's cadence methods, the stop rules and the
non-finite policy are the real ones.
"""

import math
import os
import signal
import types

import pytest

from megalm import config as C
from megalm.errors import MegalmError, NonFiniteError
from megalm.training.checkpoint.manager import Checkpointer
from megalm.training.nonfinite import NonFinitePolicy
from megalm.training.step import StepResult
from megalm.training.stop_rules import EXIT_PREEMPTED, ExitDuration, ExitInterval, Preemption, StopRules
from megalm.training.trainer import Trainer


class _Checkpointer:
    """Records saves; when to save is the real Checkpointer's code."""

    maybe_save, ensure_saved = Checkpointer.maybe_save, Checkpointer.ensure_saved
    root = "checkpoints"

    def __init__(self, cfg):
        self.cfg, self.saved_step, self.saves = cfg, None, []

    def save(self, step, consumed_samples, diagnostic=False):
        self.saves.append((step, consumed_samples, diagnostic))
        if not diagnostic:
            self.saved_step = step


class _Runner:
    """Each step's loss from ``losses`` (finite by default); a NaN step counts as skipped, as DeepSpeed books it."""

    def __init__(self, ds, losses=(), on_step=None):
        self.ds, self.losses, self.on_step, self.steps = ds, list(losses), on_step, 0

    def train(self, batches):
        self.steps += 1
        loss = self.losses.pop(0) if self.losses else 1.0
        if not math.isfinite(loss):
            self.ds.skipped_steps += 1
        if self.on_step:
            self.on_step(self.steps)
        return StepResult(loss, 16)


class _Log:
    def __init__(self):
        self.steps, self.closed = [], False

    def begin(self, start):
        pass

    def after_step(self, step, result, consumed):
        self.steps.append(step)

    def close(self):
        self.closed = True


class _Evaluator:
    def maybe_run(self, step):
        pass

    def run_test(self, step):
        pass


def _trainer(sets, losses=(), on_step=None, preemption=None, fp16=False):
    cfg = C.load(None, ["train.global_batch_size=4", "train.micro_batch_size=4", *sets])
    t = cfg.train
    ds = types.SimpleNamespace(skipped_steps=0)
    ckpt = _Checkpointer(cfg)
    stops = StopRules(preemption or Preemption(), ExitInterval(t.exit_interval, t.iters),
                      ExitDuration(t.exit_duration_minutes))
    trainer = Trainer(runner=_Runner(ds, losses, on_step), batches=None, checkpointer=ckpt, evaluator=_Evaluator(),
                      log=_Log(), nonfinite=NonFinitePolicy(ds, ckpt, t.max_skipped_steps, fp16, rank=0),
                      stops=stops, iters=t.iters, global_batch_size=t.global_batch_size,
                      save_at_end=cfg.checkpoint.save_at_end, rank=0)
    return trainer, ckpt


def test_periodic_saves_and_the_final_one():
    trainer, ckpt = _trainer(["train.iters=7", "checkpoint.interval=3", "checkpoint.save_at_end=true"])
    assert trainer.train(0, 0) == 0
    assert ckpt.saves == [(3, 12, False), (6, 24, False), (7, 28, False)]
    assert trainer.log.steps == list(range(1, 8)) and trainer.log.closed


def test_exit_interval_right_after_a_periodic_save_saves_once():
    trainer, ckpt = _trainer(["train.iters=10", "checkpoint.interval=2", "train.exit_interval=4"])
    assert trainer.train(1, 4) == 0  # a resumed run: step and samples go on from the checkpoint's
    assert ckpt.saves == [(2, 8, False), (4, 16, False)]


def test_preemption_saves_once_and_exits_75():
    preemption = Preemption()
    trainer, ckpt = _trainer(["train.iters=10", "checkpoint.interval=0"], preemption=preemption,
                             on_step=lambda s: s == 3 and os.kill(os.getpid(), signal.SIGUSR1))
    assert trainer.train(0, 0) == EXIT_PREEMPTED
    assert ckpt.saves == [(3, 12, False)]
    assert signal.getsignal(signal.SIGUSR1) is not preemption._handle  # handlers restored


def test_exit_duration_stops_with_75():
    trainer, ckpt = _trainer(["train.iters=10", "train.exit_duration_minutes=0.0000001"])
    assert trainer.train(0, 0) == EXIT_PREEMPTED and ckpt.saves == [(1, 4, False)]


def test_too_many_non_finite_steps_save_a_diagnostic_and_raise_exit_code_3():
    nan = float("nan")
    trainer, ckpt = _trainer(["train.iters=20", "train.max_skipped_steps=3"], losses=[1.0, nan, nan, 1.0, nan, nan, nan])
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as e:
        trainer.train(0, 0)
    assert ckpt.saves == [(7, 28, True)]  # the run of two (steps 2-3) was reset by step 4
    assert e.value.exit_code == 3 and MegalmError("x").exit_code == 2


def test_fp16_skips_with_a_finite_loss_do_not_count():
    trainer, ckpt = _trainer(["train.iters=6", "train.max_skipped_steps=2"], fp16=True)
    ds = trainer.runner.ds
    trainer.runner.on_step = lambda s: setattr(ds, "skipped_steps", ds.skipped_steps + 1)  # scaler calibrating
    assert trainer.train(0, 0) == 0 and ckpt.saves == [(6, 24, False)]  # the final save, no diagnostic


def _exit_duration_verdicts(rank, world_size):
    rule = ExitDuration(minutes=1.0)
    if rank == 1:
        rule.started -= 61  # this rank started (or runs) a little ahead: only its clock is past the limit
    stop = rule.check(5)
    return None if stop is None else stop.code


@pytest.mark.slow
def test_exit_duration_is_agreed_by_every_rank():
    """Each rank times itself; a rank that stopped alone would save while the others stepped on (a hang)."""
    from tests.harness import run_ranks

    assert run_ranks(_exit_duration_verdicts, 2) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
