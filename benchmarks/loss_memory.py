"""Peak memory and time of the LM loss (forward + backward) on bf16 logits, per variant, each in a fresh process.

``upcast`` is the old path (``logits.float()`` then cross-entropy: a full fp32
copy, plus fp32 log-probabilities kept for backward); ``chunked`` is
megalm's loss today (fp32 math chunk by chunk inside the vocab-parallel
cross-entropy, nothing fp32 of the logits' size kept); ``fused`` is the same
call under ``train.compile=fused`` (one compiled loop). Each variant runs once
to warm up (compiling), then once more in a fork of that process: memory is
the rise of the fork's peak RSS during that call (inputs and compiler excluded).

    python benchmarks/loss_memory.py --vocab 32768 --seq 2048 --batch 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("upcast", "chunked", "fused")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(a: argparse.Namespace) -> dict:
    """Warm up (compiles ``fused``), release freed memory, fork, and measure one call in the fresh fork."""
    import ctypes
    import os

    import torch

    from megalm.parallel import compiled_ops
    from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    logits = torch.randn(a.batch, a.seq, a.vocab, generator=g).to(torch.bfloat16).requires_grad_()
    compiled_ops.enable(a.variant == "fused")

    def once() -> tuple:
        t = time.perf_counter()
        x = logits.float() if a.variant == "upcast" else logits
        loss = vocab_parallel_cross_entropy(x, labels).mean()
        loss.backward()
        logits.grad = None
        return loss.item(), time.perf_counter() - t

    once()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fork's peak RSS starts at its current RSS: the rise is this one call's
        base = _peak_mb()
        loss, seconds = once()
        os.write(write, json.dumps([_peak_mb() - base, loss, seconds]).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    rise, loss, seconds = json.loads(os.read(read, 1 << 16))
    return {"variant": a.variant, "peak_rise_mb": round(rise, 1), "seconds": round(seconds, 3), "loss": loss,
            "logits_bf16_mb": round(logits.numel() * 2 / 2**20, 1)}


def main(argv=None) -> int:
    a = parse(argv)
    if a.variant:
        print(json.dumps(child(a)))
        return 0
    rows = []
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--vocab", str(a.vocab), "--seq", str(a.seq),
                              "--batch", str(a.batch)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not a.json:
            print(json.dumps(rows[-1]), flush=True)
    ref = rows[0]
    summary = {"shape": [a.batch, a.seq, a.vocab], "rows": rows,
               "peak_drop_mb": {r["variant"]: round(ref["peak_rise_mb"] - r["peak_rise_mb"], 1) for r in rows[1:]},
               "loss_diff": {r["variant"]: abs(r["loss"] - ref["loss"]) for r in rows[1:]}}
    print(json.dumps(summary) if a.json else json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
