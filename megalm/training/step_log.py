"""What the run reports and when: a record every ``train.log_interval`` steps, and eval/test results.

Accumulates the steps between log points (mean finite loss, tokens), turns them
into tokens/s, TFLOP/s and MFU, and writes them through MetricsWriter
(metrics.jsonl, TensorBoard, W&B) and the console (rank 0).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import torch

from megalm.config import Config
from megalm.training import ds_state
from megalm.training.metrics import MetricsWriter, Throughput, console_line, flops_per_token, peak_tflops
from megalm.training.step import StepResult

logger = logging.getLogger("megalm")


def memory_gb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB, this rank's peak RSS
    except ImportError:
        return None


class StepLog:
    """Owns the logging cadence; ``begin`` at the start step, ``after_step`` after each, ``close`` at the end."""

    def __init__(self, cfg: Config, ds: Any, dp_size: int, device: torch.device, world_size: int, rank: int):
        self.ds, self.dp_size, self.device, self.world_size, self.rank = ds, dp_size, device, world_size, rank
        self.iters, self.every = cfg.train.iters, cfg.train.log_interval
        self.fp16 = cfg.precision == "fp16"
        self.writer = MetricsWriter(cfg.run.dir, enabled=rank == 0, tensorboard=cfg.run.tensorboard,
                                    wandb=cfg.run.wandb, config=cfg.to_dict())
        self.flops_tok, self.peak = flops_per_token(cfg), peak_tflops(cfg)
        self.timer = Throughput()
        self.start_step, self.started, self.skipped_base = 0, time.time(), 0
        self._window = (0.0, 0, 0)  # (sum of finite losses, their count, tokens) since the last record

    def begin(self, start_step: int) -> None:
        self.writer.truncate_after(start_step)
        self.start_step, self.started = start_step, time.time()
        self.skipped_base = ds_state.skipped_steps(self.ds)
        self.timer = Throughput()

    def after_step(self, step: int, result: StepResult, consumed_samples: int) -> None:
        loss_sum, n, tokens = self._window
        if math.isfinite(result.loss):
            loss_sum, n = loss_sum + result.loss, n + 1
        self._window = (loss_sum, n, tokens + result.tokens)
        if step % self.every == 0 or step == self.iters:
            self._write(step, result.metrics, consumed_samples)
            self._window = (0.0, 0, 0)

    def _write(self, step: int, objective_metrics: dict, consumed_samples: int) -> None:
        loss_sum, n, tokens = self._window
        tok_s = tokens * self.dp_size / max(self.timer.lap(), 1e-9)  # every DP replica saw as many
        tflops_dev = tok_s * self.flops_tok / 1e12 / self.world_size
        gnorm = self.ds.get_global_grad_norm()
        rec = {
            "step": step,
            "loss": loss_sum / n if n else float("nan"),
            "lr": self.ds.get_lr()[0],
            "grad_norm": float(gnorm) if gnorm is not None else None,
            "loss_scale": ds_state.loss_scale(self.ds) if self.fp16 else None,
            "tokens_per_sec": tok_s,
            "tflops": tflops_dev,
            # on CPU the ranks share one machine, and the peak is the whole machine's
            "mfu": tflops_dev / self.peak if self.device.type == "cuda" else tflops_dev * self.world_size / self.peak,
            "consumed_samples": consumed_samples,
            "skipped": ds_state.skipped_steps(self.ds) - self.skipped_base,
            "mem_gb": memory_gb(self.device),
            **objective_metrics,  # the objective's own numbers (last step)
        }
        self.writer.write(rec)
        done = step - self.start_step
        eta = (time.time() - self.started) / done * (self.iters - step) if done else None
        if self.rank == 0:
            logger.info(console_line(rec, self.iters, eta))

    def evaluated(self, step: int, split: str, loss: float) -> None:
        """An evaluation result (``split`` eval or test); its time is not counted as training throughput."""
        ppl = math.exp(min(loss, 50.0))
        self.writer.write({"step": step, f"{split}_loss": loss, f"{split}_ppl": ppl})
        if self.rank == 0:
            logger.info(f"eval at step {step}: loss {loss:.4f} | ppl {ppl:.2f}" if split == "eval"
                        else f"{split} at step {step}: loss {loss:.4f}")
        self.timer.lap()

    def close(self) -> None:
        self.writer.close()
