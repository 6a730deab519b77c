#!/usr/bin/env python
"""Preprocess benchmark: megalm vs Megatron-LM's preprocess_data.py vs the bare SentencePiece floor.

Prints wall times at the same worker count, the ratios the data issue asks
for (ours <= 0.5x Megatron, <= 1.5x the floor), a byte comparison of the
outputs, and the peak-RSS growth on a 4x larger corpus. Megatron-LM is
optional (``--megatron-dir``, a checkout; ``--megatron-pythonpath`` for any
import shims it needs on this machine) and never a dependency of megalm.

    python benchmarks/preprocess_bench.py --workers 2 --megatron-dir /tmp/megatron
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = "/work/shared/data"


def make_corpus(path: str, target_mb: float, sources: list[str]) -> int:
    docs = []
    for s in sources:
        with open(s) as f:
            docs.extend(json.loads(line)["text"] for line in f)
    written, rep = 0, 0
    with open(path, "w") as out:
        while written < target_mb * 1e6:
            for i, t in enumerate(docs):
                line = json.dumps({"text": t, "id": f"{rep}-{i}"}) + "\n"
                out.write(line)
                written += len(line.encode())
                if written >= target_mb * 1e6:
                    break
            rep += 1
    return written


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MB over the process tree, stderr tail) via GNU time."""
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M"] + cmd, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    wall = time.time() - t
    if r.returncode:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rss = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("MAXRSS")]
    return wall, (rss[-1] // 1024 if rss else -1), r.stderr[-500:]


def floor_seconds(corpus: str, model: str, workers: int) -> float:
    code = (
        "import json,time,sentencepiece as spm,sys\n"
        f"sp=spm.SentencePieceProcessor(model_file={model!r})\n"
        f"texts=[json.loads(l)['text'] for l in open({corpus!r})]\n"
        "t=time.time()\n"
        f"ids=sp.encode(texts,out_type=int,num_threads={workers})\n"
        "print(time.time()-t)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip())


def same_bytes(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    p.add_argument("--tokenizer-model", default=None, help="default: train a 8k BPE on the shared corpora")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--megatron-dir", default=None)
    p.add_argument("--megatron-pythonpath", default="")
    p.add_argument("--rss-scale", type=int, default=4, help="peak-RSS check on a corpus this many times larger (0=skip)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="megalm_pp_bench_")
    os.makedirs(work, exist_ok=True)
    sources = [os.path.join(SHARED, f) for f in ("kjv.jsonl", "austen.jsonl")]
    corpus = os.path.join(work, "corpus.jsonl")
    size = make_corpus(corpus, args.mb, sources)
    model = args.tokenizer_model
    if model is None:
        model = os.path.join(work, "spm.model")
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), *sum((["--input", s] for s in sources), []),
                        "--vocab-size", str(args.vocab_size), "--output-prefix", model[:-6]], check=True,
                       capture_output=True)
    print(f"corpus {size / 1e6:.1f} MB, tokenizer {model}, workers {args.workers}")

    floor = floor_seconds(corpus, model, args.workers)
    floor1 = floor_seconds(corpus, model, 1) if args.workers != 1 else floor
    print(f"floor   sp.encode(all texts, num_threads={args.workers}): {floor:.2f}s  (num_threads=1: {floor1:.2f}s)")

    ours_prefix = os.path.join(work, "ours")
    def ours_cmd(inp: str, out: str) -> list[str]:
        return [sys.executable, os.path.join(REPO, "tools", "preprocess.py"), "--input", inp, "--output-prefix",
                out, "--tokenizer-model", model, "--append-eod", "--workers", str(args.workers), "--no-progress"]

    ours, ours_rss, _ = timed(ours_cmd(corpus, ours_prefix))
    print(f"megalm  tools/preprocess.py --workers {args.workers}: {ours:.2f}s, peak RSS {ours_rss} MB "
          f"-> {ours / min(floor, floor1):.2f}x the best floor")

    if args.megatron_dir:
        meg_prefix = os.path.join(work, "megatron")
        mcmd = [sys.executable, os.path.join(args.megatron_dir, "tools", "preprocess_data.py"), "--input", corpus,
                "--output-prefix", meg_prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                model, "--append-eod", "--workers", str(args.workers)]
        pp = ":".join(x for x in (args.megatron_pythonpath, args.megatron_dir) if x)
        meg, meg_rss, _ = timed(mcmd, {"PYTHONPATH": pp})
        ident = same_bytes(ours_prefix + "_text_document", meg_prefix + "_text_document")
        print(f"megatron preprocess_data.py --workers {args.workers}: {meg:.2f}s, peak RSS {meg_rss} MB")
        print(f"ratio megalm/megatron = {ours / meg:.2f} (target <= 0.5); byte-identical: {ident}")

    if args.rss_scale:
        big = os.path.join(work, "big.jsonl")
        with open(big, "wb") as out:
            data = open(corpus, "rb").read()
            for _ in range(args.rss_scale):
                out.write(data)
        t_big, rss_big, _ = timed(ours_cmd(big, ours_prefix + "_big"))
        print(f"megalm on {args.rss_scale}x corpus: {t_big:.2f}s, peak RSS {rss_big} MB "
              f"({(rss_big / ours_rss - 1) * 100:+.0f}% vs 1x; target < +20%)")
    print(f"workdir {work}")


if __name__ == "__main__":
    main()
