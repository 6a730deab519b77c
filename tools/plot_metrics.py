#!/usr/bin/env python
"""Render a run's metrics.jsonl as one PNG: training + eval loss, learning rate, throughput.

    python tools/plot_metrics.py RUN_DIR [--output RUN_DIR/metrics.png]

Needs matplotlib (`pip install 'megalm[plot]'`); the quick start installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load(run_dir: str) -> tuple[list[dict], list[dict]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"plot_metrics: {path} not found (is {run_dir} a megalm run directory?)")
    train, evals = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"plot_metrics: {path}:{n} is not valid JSON") from None
            (evals if "eval_loss" in rec else train).append(rec)
    return train, evals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG path (default RUN_DIR/metrics.png)")
    a = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_metrics: matplotlib is not installed: pip install matplotlib", file=sys.stderr)
        return 2
    train, evals = load(a.run_dir)
    if not train:
        print(f"plot_metrics: no training records in {a.run_dir}/metrics.jsonl", file=sys.stderr)
        return 2
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    axes[2].plot(steps, [r["tokens_per_sec"] for r in train])
    axes[2].set_title("tokens / s")
    axes[2].set_xlabel("step")
    fig.suptitle(os.path.abspath(a.run_dir))
    fig.tight_layout()
    out = a.output or os.path.join(a.run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
