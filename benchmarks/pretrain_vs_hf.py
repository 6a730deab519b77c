"""The training entry point as users run it, against Hugging Face Llama's training step, alternated in one run.

Each round runs ``python megalm/pretrain.py`` (one process, default config
apart from the shape below and bf16) for ``--iters`` steps and reads tokens/s
and MFU from its own metrics.jsonl (the first ``--skip`` logged intervals,
which hold start-up and compilation, are dropped), then times
``transformers.LlamaForCausalLM`` forward + backward + AdamW of the same shape
for as many steps in this process. Ratios are per round; min and median are
printed. ``--documents`` packs documents (``objective.reset_attention_mask``)
and gives HF its packed-sequence support (position ids restarting per document,
as often as documents start in the data: the bundled corpus's documents are
~3,700 tokens, so most 512-token samples hold one or two).

    flock /tmp/bench.lock python benchmarks/pretrain_vs_hf.py --rounds 3 [--documents]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus", "austen.jsonl")
SHAPE = ["model.num_layers=4", "model.hidden_size=512", "model.num_heads=8", "model.ffn_hidden_size=1344",
         "model.vocab_size=8192", "model.seq_length=512", "train.micro_batch_size=8", "train.global_batch_size=8",
         "precision=bf16"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="pretrain.py steps per round")
    p.add_argument("--log-interval", type=int, default=4)
    p.add_argument("--skip", type=int, default=1, help="logged intervals dropped per round (start-up, compile)")
    p.add_argument("--hf-steps", type=int, default=None, help="timed HF steps per round (default: the steps kept)")
    p.add_argument("--documents", action="store_true", help="packed documents: reset_attention_mask on both sides")
    p.add_argument("--set", dest="extra", nargs="+", default=[],
                   help="more pretrain.py overrides, e.g. train.compile=none")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "megalm_pretrain_bench"),
                   help="tokenizer + data are built here once and reused")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def prepare(work: str) -> tuple:
    """(tokenizer .model, data prefix) from the bundled corpus; built once."""
    tok, prefix = os.path.join(work, "tok.model"), os.path.join(work, "austen_text_document")
    if not os.path.exists(prefix + ".idx"):
        os.makedirs(work, exist_ok=True)
        subprocess.run([sys.executable, "-m", "megalm.cli", "train-tokenizer", "--input", CORPUS, "--vocab-size",
                        "4000", "--model-type", "bpe", "--output-prefix", os.path.join(work, "tok")],
                       check=True, capture_output=True, cwd=ROOT)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess.py"), "--input", CORPUS,
                        "--output-prefix", os.path.join(work, "austen"), "--tokenizer-model", tok,
                        "--json-keys", "text", "--append-eod", "--workers", "1"], check=True, capture_output=True,
                       cwd=ROOT)
    return tok, prefix


def run_pretrain(a: argparse.Namespace, tok: str, prefix: str, run_dir: str) -> tuple:
    """(mean tokens/s, mean tflops, mean reported mfu, steps kept, resolved train.compile) of one pretrain run."""
    docs = ["objective.reset_attention_mask=true", "objective.reset_position_ids=true"] if a.documents else []
    sets = SHAPE + docs + [f"data.tokenizer={tok}", f"data.prefix={prefix}", f"run.dir={run_dir}",
                           f"train.iters={a.iters}", f"train.log_interval={a.log_interval}",
                           f"train.eval_interval={a.iters + 1}", "train.eval_iters=0", "checkpoint.save_at_end=false",
                           *a.extra]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "megalm", "pretrain.py"), "--set", *sets],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"pretrain.py exited {p.returncode}:\n{p.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "tokens_per_sec" in r][a.skip:]
    with open(os.path.join(run_dir, "config.yaml")) as f:
        mode = next((ln.split(":", 1)[1].strip() for ln in f if ln.strip().startswith("compile:")), "?")
    mean = lambda key: statistics.fmean(r[key] for r in recs)  # noqa: E731
    return mean("tokens_per_sec"), mean("tflops"), mean("mfu"), len(recs) * a.log_interval, mode


def hf_runner(a: argparse.Namespace, prefix: str):
    """A step function for LlamaForCausalLM at the same shape (its config derived from megalm's), bf16, AdamW."""
    import transformers

    import megalm.config as C
    from megalm.hf.mapping import hf_config

    cfg = C.resolve(None, SHAPE, None, 1)[0]
    conf = transformers.LlamaConfig(**hf_config(cfg, 8192))
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).to(torch.bfloat16)
    # fused: what HF's Trainer uses by default with torch >= 2.8 (adamw_torch_fused), as megalm does
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    b, s = 8, 512
    ids = torch.randint(0, 4000, (b, s + 1), generator=g)
    pos = None
    if a.documents:  # document starts as often as in megalm's data; positions restart, which HF reads as packing
        from megalm.data.indexed import IndexedDataset

        data = IndexedDataset(prefix)
        mean_len = sum(len(data[i]) for i in range(len(data))) / len(data)
        starts = torch.rand(b, s, generator=g) < 1.0 / mean_len
        starts[:, 0] = True
        starts[0, s // 2] = True  # at least one boundary, so HF's packed path really runs
        idx = torch.arange(s).expand(b, s)
        pos = idx - torch.where(starts, idx, 0).cummax(1).values

    def step() -> None:
        loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:], position_ids=pos).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, reps: int = 5) -> float:
    """Best of ``reps`` square matmuls: what this machine's cores deliver at the model's dtype."""
    x, y = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    x @ y
    best = min(_time(lambda: x @ y) for _ in range(reps))
    return 2 * n ** 3 / best / 1e12


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    a = parse(argv)
    tok, prefix = prepare(a.work)
    hf_step = hf_runner(a, prefix)
    for _ in range(2):
        hf_step()  # warm-up
    rows = []
    for r in range(a.rounds):
        run_dir = os.path.join(a.work, f"run_{r}")
        subprocess.run(["rm", "-rf", run_dir], check=True)
        tps, tflops, mfu, steps, mode = run_pretrain(a, tok, prefix, run_dir)
        n = a.hf_steps or steps
        hf_tps = 8 * 512 * n / sum(_time(hf_step) for _ in range(n))
        rows.append({"round": r, "megalm_tokens_per_sec": round(tps, 1), "hf_tokens_per_sec": round(hf_tps, 1),
                     "ratio": round(tps / hf_tps, 3), "tflops": round(tflops, 4), "reported_mfu": round(mfu, 4),
                     "compile": mode})
        if not a.json:
            print(json.dumps(rows[-1]), flush=True)
    peak = matmul_peak_tflops()
    ratios = [row["ratio"] for row in rows]
    tflops = statistics.median(row["tflops"] for row in rows)
    result = {"documents": a.documents, "rounds": rows, "ratio_min": min(ratios),
              "ratio_median": round(statistics.median(ratios), 3), "tflops_median": tflops,
              "matmul_peak_tflops_bf16": round(peak, 4), "mfu_vs_measured_peak": round(tflops / peak, 4),
              "reported_mfu_median": statistics.median(row["reported_mfu"] for row in rows)}
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k != "rounds":
                print(f"{k:>26}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
