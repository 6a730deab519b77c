"""Where a training step's time goes: megalm's engine (built as megalm/pretrain.py builds it) vs HF Llama.

One process, the shape of benchmarks/pretrain_vs_hf.py, bf16, default config
(``train.compile`` auto). Each round runs ``--steps`` steps of every runner in
turn, so machine load hits them alike; per-phase medians are printed:
data (next batch), forward (+ loss), backward, optimizer (clip + AdamW +
copies), other (the loss read back). ``--unstreamlined`` adds megalm with
DeepSpeed's own bf16 gradient bookkeeping (what ``ds_state.streamline_bf16``
replaces) as a third runner on the same engine.

    flock /tmp/bench.lock python benchmarks/step_phases.py --rounds 6 --unstreamlined
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_vs_hf as bench  # benchmarks/pretrain_vs_hf.py: shape, data, HF model

PHASES = ("data", "forward", "backward", "optimizer", "other")


def megalm_runner(a: argparse.Namespace, tok: str, prefix: str):
    """(step function, toggle for DeepSpeed's own bf16 bookkeeping) for megalm's engine at the benchmark shape."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megalm import config as C
    from megalm import distributed
    from megalm.data.tokenizer import load_tokenizer
    from megalm.model.compile import resolve_compile
    from megalm.objectives import build_objective
    from megalm.training.batches import build_iterators, open_datasets
    from megalm.training.engine import build_engine

    distributed.init()
    sets = bench.SHAPE + [f"data.tokenizer={tok}", f"data.prefix={prefix}", f"run.dir={a.work}/phases",
                          "train.iters=100000", *a.extra]
    cfg, ds_config = C.resolve(None, sets, None, 1)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or tokenizer.vocab_size),
                      train=dataclasses.replace(cfg.train, compile=resolve_compile(cfg.train.compile, "cpu")))
    objective = build_objective(cfg, tokenizer)
    engine = build_engine(cfg, ds_config, cfg.model.vocab_size, objective)
    batches, _, _ = build_iterators(cfg, tokenizer, objective, 0, 0, 1, open_datasets(cfg, tokenizer, objective))
    ds, opt = engine.ds, engine.ds.optimizer
    fast = vars(opt).get("_update_hp_grad"), ds.enable_backward_allreduce

    def deepspeeds_own(on: bool) -> None:
        if on:
            vars(opt).pop("_update_hp_grad", None)
            ds.enable_backward_allreduce = True
        else:
            if fast[0] is not None:
                opt._update_hp_grad = fast[0]
            ds.enable_backward_allreduce = fast[1]

    def step(times: dict) -> None:
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        out = ds(**objective.inputs(batch))
        loss = engine.loss(out, objective.targets(batch))
        t2 = time.perf_counter()
        ds.backward(loss)
        t3 = time.perf_counter()
        ds.step()
        t4 = time.perf_counter()
        float(loss.detach())
        t5 = time.perf_counter()
        for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times.setdefault(k, []).append(v)

    return step, deepspeeds_own


def hf_phased():
    """benchmarks/pretrain_vs_hf.py's HF step (same model, optimizer and clipping), timed per phase."""
    import transformers

    import megalm.config as C
    from megalm.hf.mapping import hf_config

    cfg = C.resolve(None, bench.SHAPE, None, 1)[0]
    conf = transformers.LlamaConfig(**hf_config(cfg, 8192))
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, 4000, (8, 513), generator=torch.Generator().manual_seed(0))

    def step(times: dict) -> None:
        t1 = time.perf_counter()
        loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        float(loss.detach())
        t5 = time.perf_counter()
        for k, v in zip(PHASES, (0.0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times.setdefault(k, []).append(v)

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="steps per runner per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--unstreamlined", action="store_true", help="also time DeepSpeed's own bf16 bookkeeping")
    p.add_argument("--set", dest="extra", nargs="+", default=[], help="more megalm overrides")
    p.add_argument("--work", default=os.path.join("/tmp", "megalm_pretrain_bench"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    tok, prefix = bench.prepare(a.work)
    mstep, deepspeeds_own = megalm_runner(a, tok, prefix)
    runners = {"megalm": (mstep, False), "hf": (hf_phased(), None)}
    if a.unstreamlined:
        runners["megalm, DeepSpeed's bf16 bookkeeping"] = (mstep, True)
    times = {name: {} for name in runners}
    for name, (fn, own) in runners.items():
        if own is not None:
            deepspeeds_own(own)
        for _ in range(a.warmup):
            fn({})
    for _ in range(a.rounds):
        for name, (fn, own) in runners.items():
            if own is not None:
                deepspeeds_own(own)
            for _ in range(a.steps):
                fn(times[name])
    table = {name: {k: 1e3 * statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for row in table.values():
        row["total"] = sum(row[k] for k in PHASES)
    hf_total = table["hf"]["total"]
    if a.json:
        print(json.dumps({"ms": table, "speedup_vs_hf": {n: hf_total / r["total"] for n, r in table.items()}}))
        return 0
    print(f"{'runner (median ms per step)':<40}" + "".join(f"{k:>10}" for k in (*PHASES, "total")) + "   vs HF")
    for name, row in table.items():
        print(f"{name:<40}" + "".join(f"{row[k]:>10.1f}" for k in (*PHASES, "total")) +
              f"   {hf_total / row['total']:.3f}x")
    return 0


if __name__ == "__main__":
    code = main()
    os._exit(code)  # skip DeepSpeed/gloo teardown (see megalm/pretrain.py exit_without_teardown)
