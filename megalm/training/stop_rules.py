"""When a run stops early: a preemption signal, `train.exit_interval`, `train.exit_duration_minutes`.

Each rule looks at the step just finished and says whether to stop, with what
exit code and message; the trainer saves a checkpoint (once) and exits.
Exit 75 (EX_TEMPFAIL) means "checkpoint saved, requeue me and I resume".
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Optional

from megalm.parallel import comm

EXIT_PREEMPTED = 75


@dataclass(frozen=True)
class Stop:
    code: int
    message: str
    level: int = logging.WARNING


class Preemption:
    """Turns SIGUSR1/SIGTERM into a flag checked after each step.

    Installed by the entry point as early as possible, so a signal that arrives during start-up is
    remembered rather than killing the rank.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum

    def requested(self) -> bool:
        """True on every rank once any rank got the signal (Slurm signals each task, but not at once)."""
        return comm.any_rank(self.signum is not None)

    def check(self, step: int) -> Optional[Stop]:
        if self.requested():  # collective: asked on every rank after every step
            return Stop(EXIT_PREEMPTED, f"preempted at step {step}: checkpoint saved; exiting with {EXIT_PREEMPTED}")
        return None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class ExitInterval:
    """``train.exit_interval``: stop (exit 0) every N steps, short of the last."""

    def __init__(self, every: int, iters: int):
        self.every, self.iters = every, iters

    def check(self, step: int) -> Optional[Stop]:
        if self.every and step % self.every == 0 and step < self.iters:
            return Stop(0, f"train.exit_interval: checkpoint saved at step {step}; exiting", logging.INFO)
        return None


class ExitDuration:
    """``train.exit_duration_minutes``: stop (exit 75) once the job has trained that long.

    Each rank times itself, and ranks start and finish steps a little apart: the verdict is agreed (one
    all-reduce per step, only when the limit is set), or one rank would save while the others stepped on.
    """

    def __init__(self, minutes: Optional[float]):
        self.minutes = minutes
        self.started = time.time()

    def check(self, step: int) -> Optional[Stop]:
        if self.minutes and comm.any_rank((time.time() - self.started) / 60 >= self.minutes):
            return Stop(EXIT_PREEMPTED, f"train.exit_duration_minutes reached at step {step}: checkpoint saved")
        return None


class StopRules:
    """The rules in order; the first that fires wins (the preemption check runs every step: it is collective)."""

    def __init__(self, preemption: Preemption, exit_interval: ExitInterval, exit_duration: ExitDuration):
        self.preemption, self.rules = preemption, (preemption, exit_interval, exit_duration)

    def check(self, step: int) -> Optional[Stop]:
        for rule in self.rules:
            stop = rule.check(step)
            if stop is not None:
                return stop
        return None

    def close(self) -> None:
        self.preemption.restore()
