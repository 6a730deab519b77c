"""PLM forward + backward: the two streams by factorisation order (``order_rank``) vs the dense [b, 1, s, s] masks.

One process, one model (GPT with the query stream, RoPE/RMSNorm/SwiGLU), the
same batch drawn by the plm objective's collate; ``order`` passes its
order_rank with ``model.two_stream_attention: order`` (the mask-free path at
any length), ``dense`` the two masks, built beforehand (as the collate used
to), so its timing leaves out their cost. Rounds alternate the variants; each step is forward, the PLM
loss and backward (no optimizer: it is the same for both). Peak memory: the
rise of peak RSS during one step, each variant in its own process (one
thread, so that it can fork), measured in a fresh fork after warm-up; and the
bytes autograd saves for backward (distinct storages, exact).

    python benchmarks/plm_streams.py --seq 512 --batch 8 --rounds 5
    python benchmarks/plm_streams.py --seq 2048 --batch 2 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from model_shape import add_shape_args  # benchmarks/model_shape.py (this script's folder is on sys.path)

VARIANTS = ("order", "dense")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--peak", choices=VARIANTS, help=argparse.SUPPRESS)  # the memory child process
    return p.parse_args(argv)


def setup(a: argparse.Namespace) -> tuple:
    import megalm.config as C
    from megalm.build import build_model
    from megalm.model.two_stream import dense_masks
    from megalm.objectives import build_objective

    cfg = C.from_dict({"model": dict(arch="gpt", num_layers=a.layers, hidden_size=a.hidden, num_heads=a.heads,
                                     num_kv_heads=a.kv_heads, ffn_hidden_size=a.ffn, seq_length=a.seq,
                                     position="rope", norm="rmsnorm", activation="swiglu", bias=False,
                                     make_vocab_size_divisible_by=128, two_stream_attention="order"),
                       "objective": {"name": "plm"}, "precision": a.dtype})
    obj = build_objective(cfg, None)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = build_model(cfg, a.vocab).to(dtype)
    rng = np.random.default_rng(0)
    batch = obj.collate([{"tokens": rng.integers(0, a.vocab, a.seq + 1)} for _ in range(a.batch)], rng)
    order = obj.inputs(batch)
    content, query = dense_masks(order["order_rank"])
    dense = {"input_ids": order["input_ids"], "position_ids": order["position_ids"], "content_mask": content,
             "query_mask": query, "two_stream": True}
    targets = obj.targets(batch)

    def step(variant: str, saved: dict | None = None) -> float:
        """One forward + backward; ``saved`` collects the storages autograd keeps for backward (bytes)."""
        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if saved is not None else contextlib.nullcontext():
            loss = obj.loss(model(**(order if variant == "order" else dense)), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def saved_mb(step, variant: str) -> float:
    """MB of tensors autograd keeps from forward to backward (distinct storages; parameters included)."""
    saved: dict = {}
    step(variant, saved)
    return sum(saved.values()) / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rise(step, variant: str) -> float:
    """Peak-RSS rise of one step in a fresh fork (a fork's peak starts at its current RSS); one thread only."""
    import ctypes

    step(variant)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        base = _peak_mb()
        step(variant)
        os.write(write, json.dumps(_peak_mb() - base).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return json.loads(os.read(read, 1 << 16))


def _peak_child(argv, variant: str) -> float:
    args = [x for x in (sys.argv[1:] if argv is None else argv)]
    out = subprocess.run([sys.executable, __file__, *args, "--peak", variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    a = parse(argv)
    if a.peak:
        torch.set_num_threads(1)  # OpenMP's threads do not survive a fork
        print(json.dumps(peak_rise(setup(a), a.peak)))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    step = setup(a)
    losses = {v: step(v) for v in VARIANTS}  # warm-up
    times: dict = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            t = time.perf_counter()
            for _ in range(a.steps):
                step(v)
            times[v].append((time.perf_counter() - t) / a.steps)
    ratios = [d / o for o, d in zip(times["order"], times["dense"])]
    out = {"shape": {"batch": a.batch, "seq": a.seq, "layers": a.layers, "hidden": a.hidden, "dtype": a.dtype},
           "median_s": {v: round(statistics.median(t), 4) for v, t in times.items()},
           "dense_over_order_per_round": [round(x, 3) for x in ratios],
           "dense_over_order_median": round(statistics.median(ratios), 3),
           "saved_for_backward_mb": {v: round(saved_mb(step, v), 1) for v in VARIANTS},
           "peak_rise_mb": {v: round(_peak_child(argv, v), 1) for v in VARIANTS},
           "loss": losses, "load": os.getloadavg()}
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
