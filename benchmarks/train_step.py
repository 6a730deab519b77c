"""Training-step throughput of megalm's GPT on one process (no DeepSpeed), optionally against HF Llama.

forward + backward + torch.optim.AdamW step; warm-up steps, then ``--steps``
timed steps. ``--compare-hf`` builds transformers' LlamaForCausalLM with the
same shape, dtype and optimizer and times it in the same run, alternating
rounds between the two so background load hits both alike.

    python benchmarks/train_step.py --layers 4 --hidden 512 --heads 8 --ffn 1344 --vocab 8192 \\
        --seq 512 --batch 8 --pos rope --norm rmsnorm --act swiglu --no-bias --untied --dtype bf16 --compare-hf \\
        [--compile none,fused,blocks --rounds 3] [--documents 4]

Every runner gets its own model; ``--rounds`` alternates them (ours in each
compile mode, the dense-mask variant with ``--documents``, HF) so load drifts
hit all alike. ``benchmarks/pretrain_vs_hf.py`` times the real entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch

from model_shape import add_shape_args  # benchmarks/model_shape.py (this script's folder is on sys.path)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--pos", choices=("rope", "learned", "sinusoidal"), default="rope")
    p.add_argument("--norm", choices=("rmsnorm", "layernorm"), default="rmsnorm")
    p.add_argument("--act", choices=("swiglu", "gelu"), default="swiglu")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--untied", action="store_true")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="alternate ours/HF this many times (with --compare-hf)")
    p.add_argument("--compare-hf", action="store_true", help="also time HF LlamaForCausalLM (needs rope/rmsnorm/swiglu)")
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top ops for one of our steps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", default="auto",
                   help="train.compile mode(s) for megalm, comma-separated to time several alternated: "
                        "auto (the device's default) | none (eager) | fused (torch.compile of norm, activation, RoPE "
                        "and loss) | blocks (each block compiled); compiled once during warm-up")
    p.add_argument("--documents", type=int, default=0,
                   help="pack this many documents per sample (CLM's reset_attention_mask); megalm also runs its "
                        "dense-mask path, HF its packed-sequence support (position_ids restarting per document)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by process CPU time instead of wall clock (steadier on a shared machine)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p.parse_args(argv)


def make_cfg(a: argparse.Namespace):
    import megalm.config as C

    return C.from_dict({"model": dict(
        arch="gpt", num_layers=a.layers, hidden_size=a.hidden, num_heads=a.heads, num_kv_heads=a.kv_heads,
        ffn_hidden_size=a.ffn, seq_length=a.seq, position=a.pos, norm=a.norm, activation=a.act, bias=not a.no_bias,
        tie_embeddings=not a.untied, make_vocab_size_divisible_by=128), "precision": a.dtype})


def ours(a: argparse.Namespace, dtype: torch.dtype, mode: str = "none", inputs: dict | None = None) -> tuple:
    from megalm.build import build_model
    from megalm.model.compile import apply_compile
    from megalm.parallel import compiled_ops
    from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy

    model = apply_compile(build_model(make_cfg(a), a.vocab).to(dtype), mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as megalm trains and HF's Trainer
    inputs = inputs or {}

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        compiled_ops.enable(mode in ("fused", "blocks"))  # global switch: modes are timed alternately in one process
        loss = vocab_parallel_cross_entropy(model(ids, **inputs), labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def hf(a: argparse.Namespace, dtype: torch.dtype, position_ids: torch.Tensor | None = None) -> tuple:
    import transformers

    from megalm.hf.mapping import hf_config

    conf = transformers.LlamaConfig(**hf_config(make_cfg(a), a.vocab))
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as megalm trains and HF's Trainer

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=labels, position_ids=position_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def packed(b: int, s: int, n: int) -> tuple:
    """(segment ids, positions restarting per document, dense mask [b, 1, s, s]) for n uneven documents a sample."""
    g = torch.Generator().manual_seed(1)
    cuts = torch.sort(torch.randint(1, s, (b, n - 1), generator=g), dim=1).values
    starts = torch.zeros(b, s, dtype=torch.long)
    starts.scatter_(1, cuts, 1)
    seg = starts.cumsum(1)
    idx = torch.arange(s).expand(b, s)
    first = torch.where(torch.cat([torch.ones(b, 1, dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1), idx, 0)
    pos = idx - first.cummax(1).values
    dense = torch.ones(s, s, dtype=torch.bool).tril() & (seg[:, None, :, None] == seg[:, None, None, :])
    return seg, pos, dense


def timed(step: Callable, ids: torch.Tensor, labels: torch.Tensor, warmup: int, steps: int,
          clock: Callable = time.perf_counter) -> float:
    for _ in range(warmup):
        step(ids, labels)
    t = clock()
    for _ in range(steps):
        step(ids, labels)
    return clock() - t


def flops_per_token(model: torch.nn.Module, a: argparse.Namespace) -> float:
    """6 x params (matmul fwd+bwd) + attention scores/values (12 x layers x seq x hidden, no causal discount)."""
    n = sum(p.numel() for n_, p in model.named_parameters() if "pos." not in n_)
    return 6.0 * n + 12.0 * a.layers * a.seq * a.hidden


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    from megalm.model.compile import resolve_compile

    modes = [resolve_compile(m.strip(), "cpu") for m in a.compile.split(",")]
    clock = time.process_time if a.cpu_time else time.perf_counter
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    labels = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    tokens = a.batch * a.seq

    docs = packed(a.batch, a.seq, a.documents) if a.documents else None
    runners = []
    for mode in modes:
        name = "megalm" if len(modes) == 1 else f"megalm[{mode}]"
        model, step = ours(a, dtype, mode, {"segment_ids": docs[0], "position_ids": docs[1]} if docs else None)
        runners.append((name, step))
        if docs:  # the same model and mode on the dense [b, 1, s, s] mask path
            _, dense = ours(a, dtype, mode, {"attention_mask": docs[2], "position_ids": docs[1]})
            runners.append((name + "/dense", dense))
    params = sum(p.numel() for p in model.parameters())
    if a.compare_hf:
        if (a.pos, a.norm, a.act) != ("rope", "rmsnorm", "swiglu"):
            print("--compare-hf needs --pos rope --norm rmsnorm --act swiglu (LlamaForCausalLM)", file=sys.stderr)
            return 2
        runners.append(("hf", hf(a, dtype, docs[1] if docs else None)[1]))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, run in runners:
            timed(run, ids, labels, a.warmup, 0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(ids, labels)
            print(f"== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))

    elapsed = {name: 0.0 for name, _ in runners}
    for r in range(a.rounds):
        for name, run in runners:
            elapsed[name] += timed(run, ids, labels, a.warmup if r == 0 else 1, a.steps, clock)
    n_steps = a.steps * a.rounds
    tps = {name: round(tokens * n_steps / elapsed[name], 1) for name, _ in runners}
    first = runners[0][0]
    result: dict = {"tokens_per_sec": tps[first], "tflops": round(tps[first] * flops_per_token(model, a) / 1e12, 4),
                    "params": params, "compile": ",".join(modes), "runs": tps}
    if a.compare_hf:
        result.update(hf_tokens_per_sec=tps["hf"], speedup_vs_hf=round(tps[first] / tps["hf"], 3),
                      speedups_vs_hf={n: round(t / tps["hf"], 3) for n, t in tps.items() if n != "hf"})
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
