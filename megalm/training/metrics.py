"""Where numbers go: console lines, TensorBoard scalars and run.dir/metrics.jsonl (rank 0 only).

Also the FLOP count behind tokens/s -> TFLOP/s -> MFU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Optional

from megalm.config import Config

logger = logging.getLogger("megalm")

# Dense peak TFLOP/s per device for MFU (bf16/fp16 tensor cores; fp32 where noted).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls and attention."""
    m = cfg.model
    h, layers, s = m.hidden_size, m.num_layers, m.seq_length
    head_dim = h // m.num_heads
    vocab = m.vocab_size or 32000
    attn_proj = h * (m.num_heads * head_dim + 2 * m.kv_heads * head_dim) + m.num_heads * head_dim * h
    mlp = (3 if m.activation == "swiglu" else 2) * h * m.ffn_size
    attn_scores = 2 * s * h  # QK^T and AV, per token, per layer (no causal discount, as Megatron counts)
    forward = 2 * (layers * (attn_proj + mlp) + h * vocab) + 2 * layers * attn_scores
    return 3.0 * forward


def peak_tflops(cfg: Config) -> float:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
        return 312.0
    # Measured on our 2-core EPYC (torch 2.13, 2 threads, 2048^2 matmul): ~0.98 TFLOP/s bf16, ~0.145 fp32.
    return 0.98 if cfg.precision == "bf16" else 0.145


class MetricsWriter:
    """Writes one record per logged step; only the rank that owns the console (global rank 0) writes."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, wandb: Optional[Any] = None,
                 config: Optional[dict] = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if enabled and wandb is not None and wandb.project:
            from megalm.training.wandb_log import WandbLogger

            os.makedirs(run_dir, exist_ok=True)
            self._wandb = WandbLogger(run_dir, wandb.project, wandb.name, wandb.mode, config or {})
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
                except ImportError:  # tensorboard is a dependency; tolerate a broken install
                    logger.warning("tensorboard not importable; metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        scalars = {(f"train/{k}" if not k.startswith("eval") else f"eval/{k}"): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v)}
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, record["step"])
            self._tb.flush()
        if self._wandb is not None:  # the same scalars, the same names
            self._wandb.log(scalars, record["step"])

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint's step so the file reads as one run."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep, torn = [], 0
        with open(self.path, "rb") as f:
            for raw in f:
                line = raw.replace(b"\0", b"").decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    torn += 1  # a write cut short by a kill or a crash (often NUL-filled): not a record
                    continue
                if rec.get("step", 0) <= step:
                    keep.append(line + "\n")
        if torn:
            logger.warning(f"{self.path}: dropped {torn} torn line(s) (a write cut short by a crash); "
                           f"kept {len(keep)} complete record(s)")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


class Throughput:
    """Tokens/s between log points."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def lap(self) -> float:
        now = time.time()
        dt, self.t0 = now - self.t0, now
        return dt


def console_line(rec: dict, total: int, eta_s: Optional[float]) -> str:
    parts = [f"step {rec['step']:>6}/{total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.3e}",
             f"gnorm {rec['grad_norm']:.3f}" if rec.get("grad_norm") is not None else "gnorm n/a"]
    if rec.get("loss_scale") is not None:
        parts.append(f"scale {rec['loss_scale']:.0f}")
    parts += [f"{rec['tokens_per_sec']:.0f} tok/s", f"{rec['tflops']:.2f} TFLOP/s/dev", f"MFU {100 * rec['mfu']:.1f}%"]
    if rec.get("mem_gb") is not None:
        parts.append(f"mem {rec['mem_gb']:.2f} GB")
    if rec.get("skipped"):
        parts.append(f"skipped {rec['skipped']}")
    if eta_s is not None:
        parts.append(f"ETA {int(eta_s // 60)}m{int(eta_s % 60):02d}s")
    return " | ".join(parts)
