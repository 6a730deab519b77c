"""The training loop: steps, periodic eval, logging, checkpoints, preemption and NaN policy.

One optimizer step = ``grad_accum`` micro-batches on each data-parallel rank
(or one ``train_batch`` of the pipeline engine); every logged value is global.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from typing import Any, Iterator, Optional

import torch

from megalm.config import Config
from megalm.errors import MegalmError
from megalm.objectives.base import Objective
from megalm.parallel import comm
from megalm.training.engine import Engine
from megalm.training.metrics import MetricsWriter, Throughput, console_line, flops_per_token, peak_tflops

logger = logging.getLogger("megalm")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved after SIGUSR1/SIGTERM; requeue and resume
EXIT_TOO_MANY_SKIPS = 3  # train.max_skipped_steps consecutive non-finite steps


class Preemption:
    """Turns SIGUSR1/SIGTERM into a flag the loop checks after each step."""

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

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _dp_mean(value, engine: Engine) -> float:
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
        batch = _to_device(next(self.batches), self.device)
        self.tokens += self.objective.tokens_in(batch)
        return self.objective.inputs(batch), self.objective.targets(batch)


def train_step(engine: Engine, objective: Objective, batches: Iterator[dict], grad_accum: int,
               device: torch.device) -> tuple[float, int]:
    """One optimizer step; returns (global mean loss, tokens this DP rank processed)."""
    ds = engine.ds
    if engine.pipeline:
        feed = PipeFeed(batches, objective, device)
        loss = ds.train_batch(data_iter=feed)
        # The pipeline engine broadcasts the DP-averaged loss from the last stage to all stages.
        return float(loss.item()), feed.tokens or _stage_tokens(objective, grad_accum)
    losses, tokens, extras = [], 0, {}
    for _ in range(grad_accum):
        batch = _to_device(next(batches), device)
        tokens += objective.tokens_in(batch)
        out = ds(*objective.inputs(batch))
        targets = objective.targets(batch)
        loss = engine.loss(out, targets)
        ds.backward(loss)
        ds.step()
        losses.append(loss.detach())
        with torch.no_grad():
            for k, v in objective.metrics(out, targets).items():
                extras.setdefault(k, []).append(float(v))
    engine.last_metrics = {k: _dp_mean(sum(v) / len(v), engine) for k, v in extras.items()}
    return _dp_mean(torch.stack(losses).mean(), engine), tokens


def _stage_tokens(objective: Objective, grad_accum: int) -> int:
    # Middle pipeline stages pull no data; count what the first stage saw.
    return grad_accum * objective.cfg.train.micro_batch_size * objective.cfg.model.seq_length


@torch.no_grad()
def evaluate(engine: Engine, objective: Objective, batches: Iterator[dict], iters: int, grad_accum: int,
             device: torch.device) -> float:
    """Mean validation loss over ``iters`` global batches."""
    ds = engine.ds
    total = 0.0
    if engine.pipeline:
        for _ in range(iters):
            total += float(ds.eval_batch(data_iter=PipeFeed(batches, objective, device)).item())
        ds.train()
        engine.guard.bad = False  # eval losses go through the same loss_fn; they never skip a step
        return total / iters
    ds.eval()
    losses = []
    for _ in range(iters * grad_accum):
        batch = _to_device(next(batches), device)
        out = ds(*objective.inputs(batch))
        losses.append(objective.loss(out, objective.targets(batch)).detach())
    ds.train()
    return _dp_mean(torch.stack(losses).mean(), engine)


def _loss_scale(engine: Engine) -> Optional[float]:
    opt = getattr(engine.ds, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
        if torch.is_tensor(value):
            return float(value.item())
    return None


def _memory_gb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB, this rank's peak RSS
    except ImportError:
        return None


def run(cfg: Config, engine: Engine, objective: Objective, train_batches: Iterator[dict],
        valid_batches: Optional[Any], checkpointer: Any, start_step: int, consumed_samples: int,
        device: torch.device, world_size: int, rank: int, preempt: Optional[Preemption] = None,
        test_batches: Optional[Any] = None) -> int:
    """Train from ``start_step`` to ``train.iters``; return the process exit code.

    ``preempt`` is installed by the entry point as early as possible, so a signal that arrives during
    start-up is remembered rather than killing the rank.
    """
    t = cfg.train
    grad_accum = cfg.grad_accum_steps(world_size)
    writer = MetricsWriter(cfg.run.dir, enabled=rank == 0, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                           config=cfg.to_dict())
    writer.truncate_after(start_step)
    flops_tok = flops_per_token(cfg)
    peak = peak_tflops(cfg)
    preempt = preempt or Preemption()
    started = time.time()
    timer = Throughput()
    window_loss, window_steps, window_tokens = 0.0, 0, 0
    skipped_base = getattr(engine.ds, "skipped_steps", 0)
    consecutive_bad = 0
    skipped_seen = skipped_base
    step = start_step
    try:
        while step < t.iters:
            loss, tokens = train_step(engine, objective, train_batches, grad_accum, device)
            step += 1
            consumed_samples += t.global_batch_size
            checkpointer.consumed_samples = consumed_samples
            skipped_now = getattr(engine.ds, "skipped_steps", 0)
            step_skipped = skipped_now > skipped_seen
            skipped_seen = skipped_now
            # fp16 skips with a finite loss are the loss scaler calibrating, not a sick run
            if step_skipped and (cfg.precision != "fp16" or not math.isfinite(loss)):
                consecutive_bad += 1
                if rank == 0:
                    logger.warning(f"step {step}: non-finite loss or gradient norm; update skipped "
                                   f"({consecutive_bad} in a row)")
                if consecutive_bad >= t.max_skipped_steps:
                    checkpointer.save(step, diagnostic=True)
                    raise MegalmError(
                        f"{consecutive_bad} consecutive steps had a non-finite loss or gradient norm (last at step "
                        f"{step}); their updates were skipped and a diagnostic checkpoint was saved in "
                        f"{checkpointer.root}. Lower optim.lr, check the data, or use bf16 instead of fp16."
                    )
            else:
                consecutive_bad = 0
            if math.isfinite(loss):
                window_loss += loss
                window_steps += 1
            window_tokens += tokens
            if step % t.log_interval == 0 or step == t.iters:
                dt = timer.lap()
                global_tokens = window_tokens * engine.dp_size  # every DP replica saw as many
                tok_s = global_tokens / max(dt, 1e-9)
                tflops_dev = tok_s * flops_tok / 1e12 / world_size
                gnorm = engine.ds.get_global_grad_norm()
                rec = {
                    "step": step,
                    "loss": window_loss / max(window_steps, 1) if window_steps else float("nan"),
                    "lr": engine.ds.get_lr()[0],
                    "grad_norm": float(gnorm) if gnorm is not None else None,
                    "loss_scale": _loss_scale(engine) if cfg.precision == "fp16" else None,
                    "tokens_per_sec": tok_s,
                    "tflops": tflops_dev,
                    # on CPU the ranks share one machine, and the peak is the whole machine's
                    "mfu": tflops_dev / peak if device.type == "cuda" else tflops_dev * world_size / peak,
                    "consumed_samples": consumed_samples,
                    "skipped": getattr(engine.ds, "skipped_steps", 0) - skipped_base,
                    "mem_gb": _memory_gb(device),
                    **engine.last_metrics,  # the objective's own numbers (last step)
                }
                writer.write(rec)
                done = step - start_step
                eta = (time.time() - started) / done * (t.iters - step) if done else None
                if rank == 0:
                    logger.info(console_line(rec, t.iters, eta))
                window_loss, window_steps, window_tokens = 0.0, 0, 0
            if valid_batches is not None and (step % t.eval_interval == 0 or step == t.iters) and t.eval_iters > 0:
                eval_loss = evaluate(engine, objective, valid_batches(), t.eval_iters, grad_accum, device)
                rec = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}
                writer.write(rec)
                if rank == 0:
                    logger.info(f"eval at step {step}: loss {eval_loss:.4f} | ppl {rec['eval_ppl']:.2f}")
                timer.lap()  # eval time is not training throughput
            saved_at = None
            periodic = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
            if periodic and step < t.iters:
                checkpointer.save(step)
                saved_at = step
            if preempt.requested():
                if saved_at != step:
                    checkpointer.save(step)
                if rank == 0:
                    logger.warning(f"preempted at step {step}: checkpoint saved; exiting with {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
            if t.exit_interval and step % t.exit_interval == 0 and step < t.iters:
                if saved_at != step:
                    checkpointer.save(step)
                if rank == 0:
                    logger.info(f"train.exit_interval: checkpoint saved at step {step}; exiting")
                return 0
            if t.exit_duration_minutes and (time.time() - started) / 60 >= t.exit_duration_minutes:
                if saved_at != step:
                    checkpointer.save(step)
                if rank == 0:
                    logger.warning(f"train.exit_duration_minutes reached at step {step}: checkpoint saved")
                return EXIT_PREEMPTED
        if test_batches is not None and step > start_step:  # data.test: once, at the end (as Megatron)
            test_loss = evaluate(engine, objective, test_batches(), t.eval_iters, grad_accum, device)
            writer.write({"step": step, "test_loss": test_loss, "test_ppl": math.exp(min(test_loss, 50.0))})
            if rank == 0:
                logger.info(f"test at step {step}: loss {test_loss:.4f}")
        if cfg.checkpoint.save_at_end and step > start_step:
            checkpointer.save(step)
        return 0
    finally:
        preempt.restore()
        writer.close()
