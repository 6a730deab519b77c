"""One is_causal SDPA call vs megalm's two half-calls (``megalm.model.causal_attention``) on this CPU, per length.

Forward + backward, bf16, 8 heads of 64, about 4096 tokens per batch, the two
forms alternated ``--rounds`` times in one process; prints the best time of
each and the ratio (> 1: the split is faster). ``SPLIT_LENGTHS`` in
causal_attention.py is the band where this ratio is above 1; re-run after a
torch upgrade.

    flock /tmp/bench.lock python benchmarks/cpu_causal_attention.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from megalm.model import causal_attention as ca


def _one(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _time(fn, q, k, v, go, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        fn(q, k, v).backward(go)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 320, 384, 448, 512, 576, 640, 1024])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    for s in a.lengths:
        b = max(1, a.tokens // s)
        q, k, v = (torch.randn(b, 8, s, 64, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        go = torch.randn_like(q)
        best = {"one": float("inf"), "split": float("inf")}
        for fn in (_one, ca.split_causal_attention):
            _time(fn, q, k, v, go, 1)  # warm-up
        for _ in range(a.rounds):
            for name, fn in (("one", _one), ("split", ca.split_causal_attention)):
                best[name] = min(best[name], _time(fn, q, k, v, go, a.steps))
        lo, hi = ca.SPLIT_LENGTHS
        print(json.dumps({"seq": s, "batch": b, "one_call_ms": round(1e3 * best["one"], 1),
                          "split_ms": round(1e3 * best["split"], 1), "ratio": round(best["one"] / best["split"], 3),
                          "megalm_splits": lo <= s <= hi}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
