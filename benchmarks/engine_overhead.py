"""DeepSpeed engine overhead on one rank: megalm's training step through deepspeed.initialize vs the bare
PyTorch loop of benchmarks/train_step.py (same model, data, optimizer), alternated in one process.

    python benchmarks/engine_overhead.py --layers 4 --hidden 512 --heads 8 --ffn 1344 --vocab 8192 \\
        --seq 512 --batch 8 --pos rope --norm rmsnorm --act swiglu --no-bias --untied --dtype bf16 --rounds 3

bf16 through DeepSpeed keeps fp32 master weights (as training does); the bare loop updates bf16 weights
directly, so part of the gap is that extra precision, not engine bookkeeping. --dtype fp32 isolates the engine.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # benchmarks/train_step.py


def engine_step(a):
    """One DeepSpeed step; its precision comes from the config train_step.make_cfg derives from ``a``."""
    import deepspeed

    import megalm.config as C
    from megalm import distributed
    from megalm.build import build_model
    from megalm.parallel import state
    from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megalm.training.engine import param_groups

    distributed.init()
    state.initialize(1, 1)
    cfg = train_step.make_cfg(a)
    cfg = C.from_dict({**cfg.to_dict(), "train": {"micro_batch_size": a.batch, "global_batch_size": a.batch},
                       "optim": {"clip_grad": 1.0}})
    ds_config = C.deepspeed_config(cfg, 1)
    model = build_model(cfg, a.vocab)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=state.mpu())

    def step(ids, labels):
        loss = vocab_parallel_cross_entropy(engine(ids).float(), labels).mean()
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def main(argv=None) -> int:
    p = train_step.parse(argv)
    a = p
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    labels = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    runners = [("bare", train_step.ours(a, dtype)[1]), ("deepspeed", engine_step(a))]
    elapsed = {n: 0.0 for n, _ in runners}
    for r in range(a.rounds):
        for name, run in runners:
            elapsed[name] += train_step.timed(run, ids, labels, a.warmup if r == 0 else 1, a.steps)
    tokens = a.batch * a.seq * a.steps * a.rounds
    res = {f"{n}_tokens_per_sec": round(tokens / t, 1) for n, t in elapsed.items()}
    res["engine_overhead_pct"] = round(100 * (elapsed["deepspeed"] / elapsed["bare"] - 1), 1)
    print(json.dumps(res) if a.json else "\n".join(f"{k:>26}: {v}" for k, v in res.items()))
    from megalm import distributed

    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
